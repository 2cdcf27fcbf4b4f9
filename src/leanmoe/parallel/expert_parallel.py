"""Expert parallelism over ``torch.distributed``: experts sharded over a process group, tokens moved by all-to-all.

Legend: T tokens on this rank, D model dim, E experts (global), L experts per rank (E / P), K top-k, P ranks in the
expert-parallel group, R routed rows on this rank (T*K), S rows this rank's experts receive (from every rank).

:func:`expert_parallel` first checks, with one all-gather of a fixed-size fingerprint, that every rank holds the same
full layer (:func:`check_ranks_agree`: the same ``ValueError`` on every rank otherwise, ``TimeoutError`` when a rank
does not join in time), then shards ``layer.experts`` in place (rank p keeps experts ``[p*L, (p+1)*L)``) and swaps
``layer.dispatcher`` for an :class:`ExpertParallelDispatcher`. A forward then runs:

1. plan (no host sync): stable sort of the R routed rows by global expert id, which groups them by destination rank
   and, inside a rank, by local expert; the rows of masked tokens sort last and are in no count, so they are never
   sent; ``send_counts_PL`` counts kept rows per (destination rank, local expert);
2. exchange counts: an all-to-all of ``send_counts_PL`` gives ``recv_counts_PL`` (rows per source rank and local
   expert); both come to the host in one copy: **the one host sync per forward** (all-to-all split sizes must be
   host integers);
3. dispatch: gather the rows' tokens in sorted order and all-to-all them (autograd-aware) to the expert owners;
   local expert ids of the received rows follow from ``recv_counts_PL`` (no ids travel);
4. experts: ``layer.experts`` runs on the S received rows with K=1 and weight 1, with any leanmoe backend;
5. combine: all-to-all back to the source ranks (the backward of step 3 runs the other way), undo the sort (masked
   rows are zero rows), and ``y_t = sum_k w_tk * out_tk`` on the source rank with a masked token's weights set to 0,
   so routing-weight gradients never leave it and a masked token's output and gradients are exactly 0.
Backward runs the two all-to-alls in reverse with the split sizes already known: no host sync.

Router and shared experts stay replicated. Their gradients come from this rank's tokens only, like any
data-parallel replica; the expert shards' gradients already hold every rank's contribution (the all-to-all backward
brings them home). See ``docs/EXPERT_PARALLEL.md`` for the gradient-reduction rules and FSDP2 composition.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import time
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from leanmoe.experts.plan import RankPlan, combine, plan_experts, received_expert_ids
from leanmoe.parallel.dispatcher import DispatchMeta, LocalDispatcher

if TYPE_CHECKING:  # leanmoe.layer imports this package
    from leanmoe.layer import MoE

#: The ``layer.experts`` parameters that are split along dim 0 (the expert dim); absent biases are skipped.
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Where this rank's experts sit: ``Shard(0)`` of each expert parameter over ``group``.

    Rank ``ep_rank`` of ``ep_size`` holds global experts ``[first_expert, first_expert + num_local_experts)``.
    """

    group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    num_experts: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local_experts


def plan_dispatch(topk_ids_TK: torch.Tensor, num_experts: int, ep_size: int,
                  token_mask_T: torch.Tensor | None = None) -> RankPlan:
    """Sorts the routed rows by global expert (hence by destination rank) and counts them per (rank, local expert):
    the index logic of one dispatch (step 1), as the routing plan's per-rank view
    (:class:`leanmoe.experts.plan.RankPlan`: ``sorted_rows_R`` the send order, ``send_counts_PL``).

    ``topk_ids_TK [T, K]`` holds global expert ids in ``[0, num_experts)``; experts are split contiguously, so expert
    ``e`` lives on rank ``e // (num_experts // ep_size)`` as local expert ``e % (num_experts // ep_size)``.
    ``token_mask_T [T]`` (bool, True = keep, or None): the rows of masked tokens sort after every kept row and are
    in no count. The sort is :func:`leanmoe.experts.plan.plan_experts`'s, the one the local backends use.
    """
    return plan_experts(topk_ids_TK, num_experts, token_mask_T=token_mask_T).per_rank(ep_size)


@dataclasses.dataclass(frozen=True)
class ExpertParallelMeta(DispatchMeta):
    """State carried from :meth:`ExpertParallelDispatcher.dispatch` to :meth:`~ExpertParallelDispatcher.combine`.

    ``token_mask_T`` (the mask the experts apply) stays None: no masked row is ever sent. ``source_mask_T`` is the
    layer's mask of this rank's tokens, for the combine.
    """

    plan: RankPlan
    topk_weights_TK: torch.Tensor
    input_splits: tuple[int, ...]  # rows sent to each rank (host ints)
    output_splits: tuple[int, ...]  # rows received from each rank (host ints)
    source_mask_T: torch.Tensor | None = None


def _all_to_all_rows(x_ND: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of rows; its backward is the all-to-all the other way.

    ``all_to_all_single_autograd`` is what torch 2.13's deprecation of ``torch.distributed.nn.functional
    .all_to_all_single`` points to; it is asynchronous (the wait happens at the result's first use).
    """
    return all_to_all_single_autograd(x_ND.contiguous(), list(output_splits), list(input_splits), group)


class ExpertParallelDispatcher(LocalDispatcher):
    """Moves routed rows to the ranks that own their experts and back (see the module docstring for the steps).

    ``dispatch(x_TD, topk_ids_TK, topk_weights_TK, *, token_mask_T=None)`` (``token_mask_T [T]`` bool, True = keep)
    returns ``x_SD`` (kept rows only), local ids ``[S, 1]``, unit weights ``[S, 1]`` and an
    :class:`ExpertParallelMeta` (whose ``token_mask_T`` is None: the experts have nothing to mask);
    ``combine(y_SD, meta)`` returns ``y_TD``. Every rank of the group must call both (and run backward through
    them) the same number of times, in the same order: they are collectives.
    """

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, *,
                 token_mask_T: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ExpertParallelMeta]:
        """Sends each kept routed row to the rank that owns its expert: returns the ``[S, D]`` rows this rank
        received, their local expert ids ``[S, 1]``, unit weights ``[S, 1]`` (the routing weights are applied on
        the source rank, in :meth:`combine`) and the metadata of the way back."""
        shard = self.shard
        T = topk_ids_TK.shape[0]
        plan = plan_dispatch(topk_ids_TK, shard.num_experts, shard.ep_size, token_mask_T)

        # Zeros, not empty: the buffer is tiny, and nothing could ever read stale memory from it.
        recv_counts_PL = torch.zeros_like(plan.send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, plan.send_counts_PL, group=shard.group)
        # The one host sync of the forward: split sizes of the row all-to-alls (both directions, and backward).
        counts_2PL = torch.stack([plan.send_counts_PL, recv_counts_PL]).cpu()
        input_splits = tuple(counts_2PL[0].sum(1).tolist())
        output_splits = tuple(counts_2PL[1].sum(1).tolist())
        S = sum(output_splits)

        # Only the kept rows are gathered and sent: the masked ones sort last, past sum(input_splits).
        x_RD = x_TD.index_select(0, plan.send_tokens(sum(input_splits)))
        x_SD = _all_to_all_rows(x_RD, output_splits, input_splits, shard.group)
        ids_S1 = received_expert_ids(recv_counts_PL, S)[:, None]
        # Weight 1: the routing weights are applied in `combine`, on the source rank.
        weights_S1 = torch.ones(S, 1, dtype=x_TD.dtype, device=x_TD.device)
        meta = ExpertParallelMeta(num_tokens=T, plan=plan, topk_weights_TK=topk_weights_TK,
                                  input_splits=input_splits, output_splits=output_splits, source_mask_T=token_mask_T)
        return x_SD, ids_S1, weights_S1, meta

    def combine(self, y_SD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Returns the ``[S, D]`` expert outputs to their source ranks and sums each token's K rows with its routing
        weights, ``[T, D]`` (masked tokens: exact zeros)."""
        assert isinstance(meta, ExpertParallelMeta), type(meta)  # what this dispatcher's dispatch returned
        T, K = meta.topk_weights_TK.shape
        D = y_SD.shape[-1]
        y_RD = _all_to_all_rows(y_SD, meta.input_splits, meta.output_splits, self.shard.group)
        num_masked = T * K - y_RD.shape[0]
        if num_masked:  # the masked rows, never sent, are zero rows at the end of the sorted order
            y_RD = torch.cat([y_RD, y_RD.new_zeros(num_masked, D)])
        weights_TK = meta.topk_weights_TK.to(y_RD.dtype)
        if meta.source_mask_T is not None:
            # Whatever the router gave a masked token (NaN from a NaN row included), its weight is 0 here, so its
            # output row is exactly 0 and its routing-weight gradient exactly 0.
            weights_TK = torch.where(meta.source_mask_T[:, None], weights_TK, 0.0)
        # leanmoe.experts.plan.combine: undo the sort, then the weighted sum as one batched GEMM (no atomics).
        return combine(y_RD, meta.plan.plan, weights_TK)


def _resolve_group(mesh_or_group: DeviceMesh | dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert_parallel needs torch.distributed initialised (dist.init_process_group or torchrun)")
    if mesh_or_group is None:
        return cast(dist.ProcessGroup, dist.group.WORLD)  # set once the process group is initialised
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(f"expert_parallel needs a 1-D device mesh (e.g. mesh['ep']), got a {mesh_or_group.ndim}-D "
                             f"mesh with dims {mesh_or_group.mesh_dim_names}")
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise TypeError(f"mesh_or_group must be a 1-D DeviceMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")


#: Seconds :func:`expert_parallel` waits, by default, for every rank of the group to join its agreement check.
DEFAULT_AGREEMENT_TIMEOUT_S = 300.0
#: Size of each rank's encoded fingerprint in the agreement all-gather: fixed, so that ranks built with any
#: configs exchange buffers of one size (a size mismatch is what aborts gloo).
_FINGERPRINT_BYTES = 8192
_FINGERPRINT_FORMAT = 2
#: Config fields that each rank may choose for itself: they change how a rank computes, not what.
_RANK_LOCAL_CONFIG_FIELDS = ("backend", "save_percent")
_WEIGHTS_HINT = ("build the layer from the same seed on every rank, or build it on the meta device (or pass "
                 "check_weights=False) and load a full state_dict after expert_parallel")


def _bit_sums(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the sum of its elements' bit patterns read as integers (int64, wrapping): exact and
    independent of the reduction order, so identical tensors give identical sums on any device. One host copy."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = [t.detach().contiguous().view(ints.get(t.element_size(), torch.uint8)).sum(dtype=torch.int64)
            for t in tensors]
    if not sums:
        return []
    if len({v.device for v in sums}) == 1:
        return torch.stack(sums).tolist()
    return [int(v) for v in sums]


def _state_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``layer`` by name (``state_dict``'s tensors, without its hooks: on a
    sharded layer ``state_dict()`` is a collective)."""
    tensors: dict[str, torch.Tensor] = dict(layer.named_parameters())
    for module_name, module in layer.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                tensors[f"{module_name}.{name}" if module_name else name] = buf
    return tensors


def _config_leaves(config: object, prefix: str) -> list[tuple[str, object]]:
    """A config dataclass's fields as ``(dotted name, value)``, nested configs walked (``config.router.top_k``), so
    each setting is compared alone and the rank-local ones (``config.experts.backend``) can be left out."""
    leaves: list[tuple[str, object]] = []
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        if field.name in _RANK_LOCAL_CONFIG_FIELDS:
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            leaves += _config_leaves(value, f"{prefix}.{field.name}")
        else:
            leaves.append((f"{prefix}.{field.name}", value))
    return leaves


def _fingerprint(layer: MoE, check_weights: bool) -> dict[str, object]:
    """What must be equal on every rank of an expert-parallel group, as a flat ``{what: value}`` of JSON values."""
    experts = layer.experts
    shard = getattr(experts, "expert_shard", None)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    fp: dict[str, object] = {
        "fingerprint format": _FINGERPRINT_FORMAT,
        "expert_parallel already applied": shard is not None or isinstance(layer.dispatcher, ExpertParallelDispatcher),
        "num_experts": shard.num_experts if shard is not None else gate_up.shape[0],
        "dim": down.shape[1],
        "hidden_dim": down.shape[2],
        "gate_up rows": gate_up.shape[1],
        "dtype": str(gate_up.dtype),
        "activation": repr(getattr(experts, "activation", None)),
        "gate_up_layout": getattr(experts, "gate_up_layout", None),
        "expert biases": [getattr(experts, "gate_up_bias", None) is not None,
                          getattr(experts, "down_bias", None) is not None],
    }
    config = getattr(layer, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for name, value in _config_leaves(config, "config"):
            fp[name] = value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    tensors = _state_tensors(layer)
    for name, t in tensors.items():
        fp[f"shape of {name}"] = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    if check_weights:
        # Meta tensors hold no data: they are compared by shape only (their values come from a later state_dict).
        real = {name: t for name, t in tensors.items() if not t.is_meta}
        for name, value in zip(real, _bit_sums(list(real.values())), strict=True):
            fp[f"values of {name}"] = value
    return fp


def _encode(fp: dict[str, object]) -> bytes:
    data = json.dumps(fp).encode()
    if len(data) > _FINGERPRINT_BYTES:
        # A layer with very many tensors: their shapes and values are compared as two digests instead.
        short = {k: v for k, v in fp.items() if not k.startswith(("shape of ", "values of "))}
        for prefix in ("shape of ", "values of "):
            part = json.dumps({k: v for k, v in fp.items() if k.startswith(prefix)}).encode()
            short[prefix + "every tensor (digest)"] = hashlib.sha256(part).hexdigest()
        data = json.dumps(short).encode()
    assert len(data) <= _FINGERPRINT_BYTES, f"fingerprint of {len(data)} bytes"
    return data


def _decode(data: bytes) -> dict[str, object]:
    try:
        fp = json.loads(data.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        fp = None
    return fp if isinstance(fp, dict) else {"fingerprint format": "unreadable"}


def _ranks_by_value(values: list[object], ranks: list[int]) -> str:
    groups: dict[str, list[int]] = {}
    for value, rank in zip(values, ranks, strict=True):
        groups.setdefault(json.dumps(value), []).append(rank)
    return ", ".join(f"{v} on ranks {r}" for v, r in groups.items())


def _disagreement(fps: list[dict[str, object]], ranks: list[int]) -> str | None:
    """None when every fingerprint is equal; else what differs and on which ranks (the same text on every rank)."""
    keys = list(dict.fromkeys(k for fp in fps for k in fp))
    differ = [k for k in keys if len({json.dumps(fp.get(k)) for fp in fps}) > 1]
    # Tensors of different shapes hold different values anyway: their shape line says enough.
    differ = [k for k in differ if not (k.startswith("values of ") and "shape of " + k[10:] in differ)]
    if not differ:
        return None
    lines = []
    for key in differ:
        values = [fp.get(key) for fp in fps]
        if key.startswith("values of "):  # the sums themselves mean nothing to a reader: only the rank groups do
            distinct = list(dict.fromkeys(json.dumps(v) for v in values))
            values = [f"checksum #{distinct.index(json.dumps(v)) + 1}" for v in values]
        lines.append(f"{key}: {_ranks_by_value(values, ranks)}")
    shown = lines[:12] + ([f"... and {len(lines) - 12} more"] if len(lines) > 12 else [])
    if any(k.startswith("values of ") for k in differ):
        shown.append(f"for different values: {_WEIGHTS_HINT}")
    return ("expert_parallel needs the same full layer on every rank of the expert-parallel group; these differ:\n  "
            + "\n  ".join(shown))


def _collective_device(group: dist.ProcessGroup, layer: MoE) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    device = layer.experts.gate_up_proj.device
    return torch.device("cpu") if device.type == "meta" else device


def check_ranks_agree(layer: MoE, group: dist.ProcessGroup, *, timeout_s: float = DEFAULT_AGREEMENT_TIMEOUT_S,
                      check_weights: bool = True) -> None:
    """Checks that every rank of ``group`` holds the same full layer, with one all-gather of a fixed-size fingerprint
    (sizes, dtype, activation, layout, biases, config, every tensor's shape and, with ``check_weights``, an exact
    checksum of every parameter and persistent buffer that is not on the meta device).

    Raises the same ``ValueError`` on every rank, naming what differs and on which (global) ranks. Raises
    ``TimeoutError`` when the ranks have not all joined within ``timeout_s`` seconds (a rank that never calls
    :func:`expert_parallel` for this layer, or died); ``RuntimeError`` when the collective itself fails.
    """
    data = _encode(_fingerprint(layer, check_weights))
    device = _collective_device(group, layer)
    mine = torch.zeros(_FINGERPRINT_BYTES, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    # Zeros, not empty: whatever happens, no byte is read that a rank did not write.
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(parts, mine, group=group, async_op=True)
    # Polling is_completed() bounds the wait on every backend (NCCL's wait() returns before the data is there,
    # and a host copy would then block until the process group's own timeout).
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"expert_parallel: not every rank of the expert-parallel group (global ranks "
                f"{dist.get_process_group_ranks(group)}) joined the agreement check within {timeout_s:g} s; every "
                "rank must call expert_parallel on the same layers in the same order. The pending collective ends "
                "at the process group's own timeout (init_process_group(timeout=...))")
        time.sleep(0.005)
    work.wait()
    ranks = dist.get_process_group_ranks(group)
    fps = [_decode(bytes(part.cpu().numpy())) for part in parts]
    if all(fp.get("expert_parallel already applied") is True for fp in fps):
        raise ValueError("expert_parallel was already applied to this layer")
    message = _disagreement(fps, ranks)
    if message is not None:
        raise ValueError(message)


def _check_timeout(timeout: float | datetime.timedelta) -> float:
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds or a datetime.timedelta, got "
                         f"{timeout!r}")
    return float(seconds)


def _gather_full_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # state_dict post-hook: replace each local shard [L, ...] by the full [E, ...] tensor (a collective).
    shard = cast(ExpertShard, module.expert_shard)  # set with the hooks, by expert_parallel
    for name in EXPERT_PARAM_NAMES:
        key = prefix + name
        if key not in state_dict:
            continue
        local = state_dict[key].detach().contiguous()
        # Written whole by the all-gather before any read: every rank's shard has this shape (the ranks agreed on
        # E and the expert shapes in expert_parallel, and load_state_dict keeps shapes).
        parts = [torch.empty_like(local) for _ in range(shard.ep_size)]
        dist.all_gather(parts, local, group=shard.group)
        state_dict[key] = torch.cat(parts, 0)


def _slice_full_experts(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # load_state_dict pre-hook: a full [E, ...] tensor is cut to this rank's [L, ...] rows; a local one is kept.
    shard = cast(ExpertShard, module.expert_shard)
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    for name in EXPERT_PARAM_NAMES:
        key = prefix + name
        if key in state_dict and state_dict[key].shape[0] == shard.num_experts:
            state_dict[key] = state_dict[key][lo:hi]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every expert-parallel shard parameter in ``model``: pass them to FSDP2's ``fully_shard(ignored_params=...)``,
    and scale their gradients as ``docs/EXPERT_PARALLEL.md`` describes."""
    return [p for m in model.modules() if getattr(m, "expert_shard", None) is not None
            for n, p in m.named_parameters(recurse=False) if n in EXPERT_PARAM_NAMES]


def expert_parallel(layer: MoE, mesh_or_group: DeviceMesh | dist.ProcessGroup | None = None, *,
                    balance_group: dist.ProcessGroup | None = None,
                    timeout: float | datetime.timedelta = DEFAULT_AGREEMENT_TIMEOUT_S,
                    check_weights: bool = True) -> nn.Module:
    """Shards ``layer.experts`` over an expert-parallel group, in place, and installs the all-to-all dispatcher.

    A collective: every rank of the group calls it, for the same layers in the same order.

    Args:
        layer: a :class:`leanmoe.MoE` whose experts hold all E experts, identical on every rank of the group: same
            config, dtype and weights (same seed), or built on the ``meta`` device (then materialised and loaded
            from a full ``state_dict`` afterwards).
        mesh_or_group: a 1-D :class:`DeviceMesh` (``mesh["ep"]``) or a process group; ``None`` is the whole world.
        balance_group: where the router's load counts are summed before an aux-loss-free bias update; it must span
            every rank that holds a replica of this router (so all make the same selection). Default: the world.
        timeout: seconds (or a ``timedelta``) to wait for every rank of the group to join the agreement check.
        check_weights: compare an exact checksum of every non-meta parameter and buffer across ranks. Pass False
            only when every rank loads a full ``state_dict`` right after sharding.

    First the ranks check that they agree, with one all-gather of a fixed-size fingerprint (see
    :func:`check_ranks_agree`): a difference raises the same ``ValueError`` on every rank, naming what differs and on
    which ranks, before anything is changed.

    Effects: each expert parameter ``[E, ...]`` becomes a new ``nn.Parameter`` holding rows ``[p*L, (p+1)*L)``
    (create the optimizer afterwards); ``layer.experts.expert_shard`` records the placement (an
    :class:`ExpertShard`); ``state_dict()`` gathers full ``[E, ...]`` tensors (a collective: call it on every rank)
    and ``load_state_dict`` accepts full tensors (saved with any EP size) or this rank's shard.
    ``layer.dispatcher`` becomes an :class:`ExpertParallelDispatcher`; ``layer.router.balance_group`` is set.

    Raises ``ValueError`` when the ranks differ, when it was already applied, when ``num_experts`` is not divisible
    by the group size, or for a bad ``timeout``; ``TimeoutError`` when not every rank joins within ``timeout``;
    ``RuntimeError`` without an initialised process group. Returns ``layer``.
    """
    timeout_s = _check_timeout(timeout)
    if not isinstance(check_weights, bool):
        raise TypeError(f"check_weights must be a bool, got {type(check_weights).__name__}")
    group = _resolve_group(mesh_or_group)
    experts = layer.experts
    check_ranks_agree(layer, group, timeout_s=timeout_s, check_weights=check_weights)
    E = experts.gate_up_proj.shape[0]
    P = dist.get_world_size(group)
    if E % P:
        raise ValueError(f"num_experts must be divisible by the expert-parallel group size, got num_experts={E}, "
                         f"group size={P}")
    shard = ExpertShard(group=group, ep_rank=dist.get_rank(group), ep_size=P, num_experts=E)
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    with torch.no_grad():
        for name in EXPERT_PARAM_NAMES:
            param = getattr(experts, name, None)
            if param is None:
                continue
            setattr(experts, name, nn.Parameter(param[lo:hi].clone(), requires_grad=param.requires_grad))
    experts.expert_shard = shard
    experts.register_state_dict_post_hook(_gather_full_experts)
    experts.register_load_state_dict_pre_hook(_slice_full_experts)
    layer.dispatcher = ExpertParallelDispatcher(shard)
    layer.router.balance_group = dist.group.WORLD if balance_group is None else balance_group
    return layer
