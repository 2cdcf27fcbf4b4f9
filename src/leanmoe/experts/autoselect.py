"""``backend="auto"`` by measurement: per shape bucket, the fastest backend measured once on this GPU.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.

1. A call on a CUDA tensor is described by its shape bucket (:func:`bucket_key`: T rounded up to a power of two,
   E, D, I, K, dtype, activation, layout, biases, mask, grad or no grad, and save_percent for grad calls).
2. If this GPU and these versions (:func:`environment_key`) have a measurement for the bucket, ``auto`` takes the
   fastest backend in it; ``explain_backend`` says so and gives the times.
3. Otherwise ``auto`` returns a measuring stand-in: on its first call it times every backend that can run the
   call on the call's own tensors (forward for no-grad calls, forward and backward for grad calls;
   ``triton.testing.do_bench`` medians, autotuning done in its warm-up), keeps the fastest in memory and in
   ``$LEANMOE_CACHE_DIR/autoselect.json`` (default ``~/.cache/leanmoe``), and runs it. A no-grad call is timed as
   replays of a CUDA graph of it (:func:`graph_replay`): the device time, which is what a served step (captured,
   or compiled with ``reduce-overhead``) pays; timed eagerly, a decode-sized call measures the host's launch time
   instead, and the choice would favour the backend with the fewest launches over the one with the fastest
   kernels. A backend whose call cannot be captured is timed eagerly (it cannot serve a captured step either).

Never measured: while a CUDA graph is being captured or under torch.compile tracing (``auto`` then takes the
cached choice where there is one, else the priority order), on CPU tensors (priority order), with
``LEANMOE_AUTOSELECT=0``, for T=0, or when fewer than two backends can run the call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import tempfile
import warnings

import torch

from leanmoe.experts import registry
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall, available_backends, capability_reason, get_backend
from leanmoe.experts.weights import ExpertWeights

ENV_SWITCH = "LEANMOE_AUTOSELECT"
ENV_CACHE_DIR = "LEANMOE_CACHE_DIR"
CACHE_FILE = "autoselect.json"
#: ``triton.testing.do_bench`` budget per backend (ms of warm-up, ms of timed runs).
WARMUP_MS, REP_MS = 10, 40
#: How the times are taken; part of the environment key, so that a cache written another way is not read.
METHOD = "no-grad as CUDA-graph replays"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """The backends timed for one shape bucket (median ms each) and the fastest of them."""

    backend: str
    times_ms: dict[str, float]

    def describe(self) -> str:
        return ", ".join(f"{name} {ms:.4g} ms" for name, ms in sorted(self.times_ms.items(), key=lambda kv: kv[1]))


def enabled() -> bool:
    """``LEANMOE_AUTOSELECT`` is unset or ``"1"``; ``"0"`` turns measuring off (the priority order decides)."""
    value = os.environ.get(ENV_SWITCH, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_SWITCH} must be '0' or '1', got {value!r}")
    return value == "1"


def cache_path() -> pathlib.Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "leanmoe")
    return pathlib.Path(root) / CACHE_FILE


def token_bucket(T: int) -> int:
    """T rounded up to a power of two (0 stays 0)."""
    return 0 if T <= 0 else 1 << (T - 1).bit_length()


def bucket_key(call: ExpertsCall) -> str:
    act = call.activation
    act_name = act.name if act.name != "clamped_swiglu" else f"{act.name}({act.alpha:g},{act.limit:g})"
    mode = f"grad-save{call.save_percent:g}" if call.requires_grad else "nograd"
    return (f"T{token_bucket(call.num_tokens)}-E{call.num_experts}-D{call.dim}-I{call.hidden_dim}-K{call.top_k}-"
            f"{str(call.dtype).removeprefix('torch.')}-{act_name}-{call.gate_up_layout}-"
            f"bias{int(call.has_gate_up_bias)}{int(call.has_down_bias)}-"
            f"mask{int(getattr(call, 'has_token_mask', False))}-{mode}{_extras(call)}")


def _extras(call: ExpertsCall) -> str:
    # Only calls that differ from those of the first cache version get a suffix: existing entries keep their keys.
    extras = ""
    if call.weight_dtype is not None and call.weight_dtype != call.dtype:
        extras += f"-w{str(call.weight_dtype).removeprefix('torch.')}"
    if call.has_lora:
        extras += "-lora"
    if call.has_scales:
        extras += "-scales"
    return extras


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def environment_key(device: torch.device) -> str:
    """GPU name and the versions whose kernels were timed: a measurement holds only where all of them match."""
    return _environment_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _environment_key(index: int) -> str:
    # Cached: it is asked on every auto call on CUDA, and reading package versions takes a file system walk.
    major, minor = torch.cuda.get_device_capability(index)
    return (f"{torch.cuda.get_device_name(index)} sm{major}{minor} | torch {torch.__version__} | "
            f"triton {_version('triton')} | leanmoe {_version('leanmoe')} | {METHOD}")


_MEMORY: dict[str, dict[str, Measurement]] = {}
_LOADED_FROM: set[pathlib.Path] = set()


def _read_disk(path: pathlib.Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        warnings.warn(f"leanmoe: ignoring the unreadable autoselect cache {path}: {err}", stacklevel=3)
        return {}
    return data.get("entries", {}) if isinstance(data, dict) else {}


def _load(path: pathlib.Path) -> None:
    if path in _LOADED_FROM:
        return
    _LOADED_FROM.add(path)
    for env, buckets in _read_disk(path).items():
        for key, entry in buckets.items():
            _MEMORY.setdefault(env, {}).setdefault(key, Measurement(entry["backend"], dict(entry["times_ms"])))


def lookup(env: str, key: str) -> Measurement | None:
    _load(cache_path())
    return _MEMORY.get(env, {}).get(key)


def record(env: str, key: str, measurement: Measurement) -> None:
    """Keeps ``measurement`` in memory and merges it into the disk cache (atomically replaced)."""
    _CHOSEN.clear()
    _MEMORY.setdefault(env, {})[key] = measurement
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_disk(path)
        entries.setdefault(env, {})[key] = dataclasses.asdict(measurement)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"entries": entries}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as err:
        warnings.warn(f"leanmoe: could not write the autoselect cache {path}: {err}", stacklevel=3)


def can_measure(device: torch.device) -> bool:
    """Only CUDA timings mean anything here (tests patch this)."""
    return device.type == "cuda"


def graph_replay(fn, device: torch.device, *, warmup: int = 3):
    """``fn`` captured in a ``torch.cuda.CUDAGraph`` after ``warmup`` eager calls on a side stream (where Triton tunes
    and compiles), returned as the graph's ``replay``: the call as a server runs it, without host launch overhead.
    Raises what capture raises."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph.replay


def replayed(fn, device: torch.device):
    """:func:`graph_replay` of a no-grad ``fn`` on a CUDA device, else (other devices, or capture fails) ``fn``."""
    if device.type != "cuda":
        return fn
    try:
        return graph_replay(fn, device)
    except Exception:  # noqa: BLE001 - a call that cannot be captured is timed as it runs: eagerly
        torch.cuda.synchronize(device)
        return fn


def time_ms(fn, device: torch.device) -> float:
    """Median ms of ``fn`` (tests patch this with fake timings)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def candidates(call: ExpertsCall) -> list[ExpertsBackend]:
    """Backends ``auto`` may measure for ``call``, in priority order (never the reference loop)."""
    out = []
    for name in available_backends():
        backend = get_backend(name)
        if name == "reference" or backend.missing_packages() or capability_reason(backend, call) is not None:
            continue
        reason_of = getattr(backend, "candidate_reason", backend.auto_unsupported_reason)
        if reason_of(call) is None:
            out.append(backend)
    return out


def _fastest(measurement: Measurement, names: list[str]) -> str | None:
    timed = [n for n in names if n in measurement.times_ms]
    if len(timed) < len(names):
        return None  # a backend that can run the call now was not timed: measure again
    return min(timed, key=lambda n: (measurement.times_ms[n], names.index(n)))


def _measured_why(name: str, key: str, env: str, measurement: Measurement) -> str:
    return f"auto picked {name!r}, measured fastest for shape bucket {key} on {env}: {measurement.describe()}"


#: ``(call, switch, cache dir, backends registered) -> (backend, why)`` for calls whose bucket has a measurement: a
#: decode step asks ``auto`` once per layer, and deriving the choice again (candidates, bucket key, cache lookup, the
#: reason's text) cost ~0.3 ms of host time per call on an H200 host. Cleared with every new measurement.
_CHOSEN: dict[tuple, tuple[ExpertsBackend, str]] = {}
_CHOSEN_MAX = 4096


def choose(call: ExpertsCall) -> tuple[ExpertsBackend, str] | None:
    """The measured choice for ``call``, a measuring stand-in, or None (use the priority order)."""
    backends = registry._BACKENDS
    memo_key = (call, os.environ.get(ENV_SWITCH), os.environ.get(ENV_CACHE_DIR), id(backends), len(backends))
    chosen = _CHOSEN.get(memo_key)
    if chosen is not None:
        return chosen
    if call.num_tokens == 0 or not can_measure(call.device) or not enabled():
        return None
    cands = candidates(call)
    if len(cands) < 2:
        return None
    names = [b.name for b in cands]
    env, key = environment_key(call.device), bucket_key(call)
    measurement = lookup(env, key)
    if measurement is not None:
        fastest = _fastest(measurement, names)
        if fastest is not None:
            chosen = get_backend(fastest), _measured_why(fastest, key, env, measurement)
            if len(_CHOSEN) >= _CHOSEN_MAX:  # one entry per distinct call: a server's many batch sizes stay bounded
                _CHOSEN.clear()
            _CHOSEN[memo_key] = chosen
            return chosen
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    return (MeasuringBackend(env, key, cands, call.requires_grad),
            f"auto measures {names} on this call's inputs (shape bucket {key}, not measured yet on {env}) and "
            f"runs the fastest; until then the priority order would take {names[0]!r}")


_WEIGHT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias", "gate_up_scale", "down_scale")


class MeasuringBackend(ExpertsBackend):
    """Stand-in that ``auto`` returns for a bucket not measured yet: times the candidates on the call's own
    tensors, records the fastest and runs it."""

    name = "auto"

    def __init__(self, env: str, key: str, cands: list[ExpertsBackend], requires_grad: bool):
        self.env, self.key, self.cands, self.requires_grad = env, key, cands, requires_grad

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        args = (x_TD, topk_ids_TK, topk_weights_TK, weights)
        kwargs = dict(save_percent=save_percent)
        if token_mask is not None:
            kwargs["token_mask"] = token_mask
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing or torch.compiler.is_compiling():
            return self.cands[0](*args, **kwargs)
        measurement = self.measure(args, kwargs)
        record(self.env, self.key, measurement)
        return get_backend(measurement.backend)(*args, **kwargs)

    def measure(self, args, kwargs) -> Measurement:
        # Detached leaves with the same data: the candidates' backward passes stop at them and never touch the
        # caller's autograd graph (whose saved tensors a backward through it would free).
        def leaf(t):
            return t.detach().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point() else t

        x_TD, topk_ids_TK, topk_weights_TK, weights = args
        weights = dataclasses.replace(weights, **{f: leaf(getattr(weights, f)) for f in _WEIGHT_TENSORS})
        args = (leaf(x_TD), topk_ids_TK, leaf(topk_weights_TK), weights)
        inputs = [t for t in (args[0], args[2], *weights.tensors()) if t.requires_grad]
        if weights.active_lora is not None:
            # An adapter on frozen base weights (and an x without grad) may be all that requires grad. Its parameters
            # are shared with the caller, but autograd.grad accumulates nothing into them and each candidate builds
            # its own graph from them.
            inputs += [p for p in weights.active_lora.parameters() if p.requires_grad]
        times = {}
        for backend in self.cands:
            if self.requires_grad:
                def fn(backend=backend):
                    y = backend(*args, **kwargs)
                    torch.autograd.grad(y, inputs, torch.ones_like(y))
            else:
                def eager(backend=backend):
                    with torch.no_grad():
                        backend(*args, **kwargs)
                fn = replayed(eager, args[0].device)
            times[backend.name] = time_ms(fn, args[0].device)
            del fn  # a graph's memory pool goes with its replay
        names = [b.name for b in self.cands]
        return Measurement(min(names, key=lambda n: (times[n], names.index(n))), times)


def clear_memory() -> None:
    """Forgets the in-memory measurements (the disk cache is read again on the next lookup)."""
    _CHOSEN.clear()
    _MEMORY.clear()
    _LOADED_FROM.clear()


# The registry asks this module first for ``auto`` (outside torch.compile tracing).
registry.auto_chooser = choose
