"""benchmarks/peers.py: the torchtitan-style path against the reference, the rows it writes, and the notes of the
peers it cannot run. CPU tests run tiny fp32 shapes (the peers from PyPI need CUDA: skipped here, with a note); the
GPU test runs every implementation at small shapes.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from leanmoe.bench import harness
from leanmoe.bench.harness import make_case, reference_errors, worst_error
from leanmoe.bench.presets import PRESETS, cpu_scaled

CPU = torch.device("cpu")
PEERS_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def _load_peers():
    spec = importlib.util.spec_from_file_location("leanmoe_benchmarks_peers", PEERS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


peers = _load_peers()

pytestmark = pytest.mark.usefixtures("one_thread")


def _fast_cpu_timer(mp: pytest.MonkeyPatch) -> None:
    # The CPU timer's budget is for real runs; a test only needs the row filled.
    mp.setattr(harness, "CPU_WARMUP_RUNS", 1)
    mp.setattr(harness, "CPU_MIN_RUNS", 2)
    mp.setattr(harness, "CPU_TIME_BUDGET_S", 0.0)


@pytest.fixture
def fast_cpu_timer(monkeypatch):
    _fast_cpu_timer(monkeypatch)


def _small_case(preset_name: str, T: int, *, D=32, I=16, E=6, K=2, seed=0):
    preset = dataclasses.replace(cpu_scaled(PRESETS[preset_name]), dim=D, hidden_dim=I, num_experts=E, top_k=K)
    return make_case(preset, "uniform", T, dtype=torch.float32, device=CPU, seed=seed)


def _torchtitan(case):
    return peers.IMPLS["torchtitan-style"].build(case)


# ----------------------------------------------------------------------------------- torchtitan-style path

EDGE_CASES = [
    # (id, preset, T, E, K, ids override)
    ("T40-E6-K2", "qwen3-30b-a3b", 40, 6, 2, None),
    ("T1-below-a-tile", "qwen3-30b-a3b", 1, 6, 2, None),
    ("T0", "qwen3-30b-a3b", 0, 6, 2, None),
    ("K1", "olmoe-1b-7b", 17, 6, 1, None),
    ("K=E", "mixtral-8x7b", 9, 4, 4, None),
    ("prime-E7", "deepseek-v3", 23, 7, 3, None),
    ("empty-experts", "qwen3-30b-a3b", 3, 16, 2, None),  # 6 routed rows over 16 experts: most get none
    ("all-on-one-expert", "qwen3-30b-a3b", 12, 6, 1, "all-on-2"),
    ("gpt-oss-native-bias-interleaved-clamped", "gpt-oss-20b-native", 29, 5, 2, None),
    ("non-gated-relu2", "qwen3-30b-a3b", 21, 6, 2, "relu2"),
]


@pytest.mark.parametrize(("preset_name", "T", "E", "K", "variant"), [c[1:] for c in EDGE_CASES],
                         ids=[c[0] for c in EDGE_CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_torchtitan_style_matches_the_reference(preset_name, T, E, K, variant, mode):
    preset = dataclasses.replace(cpu_scaled(PRESETS[preset_name]), dim=32, hidden_dim=16, num_experts=E, top_k=K)
    if variant == "relu2":
        preset = dataclasses.replace(preset, activation=dataclasses.replace(preset.activation, name="relu2"))
    case = make_case(preset, "uniform", T, dtype=torch.float32, device=CPU, seed=3)
    if variant == "all-on-2":
        case.topk_ids_TK = torch.full_like(case.topk_ids_TK, 2)
    outs = peers.run_once(case, _torchtitan(case), mode)
    errors = reference_errors(case, outs)
    if mode == "fwdbwd":
        assert {"grad_x", "grad_topk_weights", "grad_gate_up_proj", "grad_down_proj"} <= set(errors)
        assert ("grad_gate_up_bias" in errors) == preset.bias
    name, worst = worst_error(errors)
    assert worst <= 1e-5, f"{name}: {errors}"


def test_a_wrong_peer_is_failed_and_not_timed(fast_cpu_timer):
    case = _small_case("qwen3-30b-a3b", 24)
    right = _torchtitan(case)
    # Every output (and so every gradient) 10% off: the check must stop it before it is timed.
    broken = dataclasses.replace(peers.IMPLS["torchtitan-style"], build=lambda c: lambda: right() * 0.9)
    for mode in ("fwd", "fwdbwd"):
        row = peers.base_row(case, broken, mode, None)
        peers.measure(case, broken, mode, row)
        assert row["status"] == "FAILED" and row["check_ok"] is False, row
        assert row["ms"] is None and "relative error" in row["reason"]


# ----------------------------------------------------------------------------------------- skip notes


def test_a_peer_that_is_not_installed_or_needs_cuda_gets_a_row_with_the_reason():
    case = _small_case("qwen3-30b-a3b", 8)
    missing = peers.Impl(name="nope", package="no-such-moe-package", module="no_such_moe_package_xyz",
                         build=_torchtitan)
    assert peers.why_not(missing, case, "fwd", named=False) == ("not installed", "pip install no-such-moe-package")
    cuda_only = peers.Impl(name="cuda-only", module="torch", needs_cuda=True, build=_torchtitan)
    status, reason = peers.why_not(cuda_only, case, "fwdbwd", named=False)
    assert status == "skipped" and "needs CUDA" in reason


def test_liger_names_the_forms_it_does_not_compute():
    native = _small_case("gpt-oss-20b-native", 8)
    status, reason = peers._liger_reason(native, "fwd")
    assert status == "unsupported"
    assert "clamped_swiglu" in reason and "interleaved" in reason and "biases" in reason
    assert peers._liger_reason(_small_case("qwen3-30b-a3b", 8), "fwd") is None


def test_moe_ops_needs_a_power_of_two_expert_count():
    status, reason = peers._moe_ops_reason(_small_case("qwen3-30b-a3b", 8, E=6), "fwd")
    assert status == "unsupported" and "E=6" in reason
    assert peers._moe_ops_reason(_small_case("qwen3-30b-a3b", 8, E=8), "fwd") is None


# ---------------------------------------------------------------------------------------- the whole run

ROW_KEYS = {"preset", "mode", "impl", "ms", "tflops", "dense_tflops", "activation_mb", "check_ok", "status",
            "reason", "first_call_s", "version"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny CPU run shared by the tests below: ``(exit status, JSON payload, Markdown, stdout, folder)``."""
    tmp_path = tmp_path_factory.mktemp("peers")
    json_path, md_path = tmp_path / "peers.json", tmp_path / "peers.md"
    argv = ["--small", "--device", "cpu", "--preset", "qwen3-30b-a3b", "--tokens", "16", "--impl",
            "leanmoe-grouped_mm", "torchtitan-style", "moe-ops", "liger-kernel", "--json", str(json_path),
            "--markdown", str(md_path)]
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module-scoped fixture cannot use
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            _fast_cpu_timer(mp)
            status = peers.main(argv)
    finally:
        torch.set_num_threads(threads)
    return status, json.loads(json_path.read_text()), md_path.read_text(), stdout.getvalue(), tmp_path


def test_cpu_run_writes_one_row_per_impl_and_mode(cpu_run):
    status, payload, md, stdout, _ = cpu_run
    assert status == 0
    rows = payload["rows"]
    assert [(r["mode"], r["impl"]) for r in rows] == [
        (mode, impl) for mode in ("fwd", "fwdbwd")
        for impl in ("leanmoe-grouped_mm", "torchtitan-style", "moe-ops", "liger-kernel")]
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["preset"] == "qwen3-30b-a3b" and row["dense_tflops"] is None  # no dense rate on the CPU
        if row["impl"] in ("moe-ops", "liger-kernel"):
            assert row["status"] in ("not installed", "skipped") and row["reason"], row
            assert row["check_ok"] is None and row["ms"] is None
        else:
            assert row["status"] == "ok" and row["check_ok"] is True, row
            assert row["ms"] > 0 and row["tflops"] > 0 and row["first_call_s"] > 0
            assert row["max_error"] <= 1e-4
            assert row["activation_mb"] is None  # memory is measured on CUDA only
    env = payload["env"]
    assert env["command"].startswith("python benchmarks/peers.py --small") and env["date"] and env["torch"]
    assert set(env["peers"]) == {"moe-ops", "liger-kernel", "transformers-batched_mm"}
    # The report carries the environment, the command, every row and the skip reasons.
    assert md in stdout
    assert "python benchmarks/peers.py --small" in md and "torchtitan-style" in md
    assert "pip install moe-ops" in md or "needs CUDA" in md


def test_from_json_merges_runs_and_recomputes_the_ratios(cpu_run, tmp_path, capsys):
    payload = cpu_run[1]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    lean = dict(payload["rows"][0], impl=peers.LEANMOE_BASELINE, ms=2.0, frac_dense=0.5)
    peer = dict(payload["rows"][1], ms=1.0, frac_dense=1.0)
    a.write_text(json.dumps({"env": payload["env"], "rows": [lean]}))
    b.write_text(json.dumps({"env": payload["env"], "rows": [peer]}))
    merged = tmp_path / "merged.json"
    assert peers.main(["--from-json", str(a), str(b), "--json", str(merged)]) == 0
    rows = json.loads(merged.read_text())["rows"]
    assert [r["impl"] for r in rows] == [peers.LEANMOE_BASELINE, "torchtitan-style"]
    assert rows[1]["vs_leanmoe"] == pytest.approx(2.0)
    (best,) = [s for s in peers.summary(rows) if s["mode"] == "fwd"]
    assert best["peer"] == "torchtitan-style" and best["ratio"] == pytest.approx(0.5)  # the peer wins: < 1
    assert "merged from 2 runs" in capsys.readouterr().out


def test_a_run_stopped_early_lists_the_rows_it_did_not_reach(tmp_path, monkeypatch, fast_cpu_timer):
    calls = []

    def measure_then_stop(case, impl, mode, row, *, check_only=False, cuda_graphs=False):
        if calls:
            raise KeyboardInterrupt  # what a time limit looks like from inside: nothing after it runs
        calls.append(impl.name)
        row.update(status="ok", check_ok=True)

    monkeypatch.setattr(peers, "measure", measure_then_stop)
    json_path = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        peers.main(["--small", "--device", "cpu", "--preset", "qwen3-30b-a3b", "olmoe-1b-7b", "--tokens", "4",
                    "--impl", "torchtitan-style", "leanmoe-grouped_mm", "--mode", "fwdbwd", "fwd", "--json",
                    str(json_path)])
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["preset"], r["mode"], r["impl"]) for r in rows] == [
        (p, mode, impl) for p in ("qwen3-30b-a3b", "olmoe-1b-7b") for mode in ("fwdbwd", "fwd")
        for impl in ("torchtitan-style", "leanmoe-grouped_mm")]
    assert rows[0]["status"] == "ok"
    assert all(r["status"] == "not run" and "not reached" in r["reason"] for r in rows[1:])


@pytest.mark.parametrize("preset_name", ["qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-20b-native"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_transformers_batched_mm_matches_the_reference(preset_name, mode):
    pytest.importorskip("transformers")
    case = _small_case(preset_name, 7, E=5, K=3, seed=11)  # prime E, an expert or two without rows
    assert peers.why_not(peers.IMPLS["transformers-batched_mm"], case, mode, named=True) is None
    outs = peers.run_once(case, peers.IMPLS["transformers-batched_mm"].build(case), mode)
    assert set(outs) == ({"out"} if mode == "fwd" else {"out", *(f"grad_{n}" for n in case.leaves())})
    assert worst_error(reference_errors(case, outs))[1] < 1e-5


def test_transformers_batched_mm_is_skipped_where_its_weight_copies_would_not_fit(monkeypatch):
    case = _small_case("qwen3-30b-a3b", 16)
    need = peers.batched_mm_bytes(case)
    assert need == 16 * 2 * (2 * 16 + 16) * 32 * 4  # R * (N + I) * D * 4 bytes
    impl = peers.IMPLS["transformers-batched_mm"]
    monkeypatch.setattr(peers, "free_bytes", lambda device: 2 * need)  # room for the forward's copies only
    assert peers._batched_mm_reason(case, "fwd") is None
    status, reason = peers._batched_mm_reason(case, "fwdbwd")
    assert status == "skipped" and "GiB of expert-weight copies for 32 routed rows" in reason
    monkeypatch.setattr(peers, "free_bytes", lambda device: need // 2)
    assert peers.why_not(impl, case, "fwd", named=False)[0] in ("skipped", "not installed")


def test_a_peer_that_cannot_be_captured_is_skipped_under_cuda_graphs():
    case = _small_case("qwen3-30b-a3b", 4)
    assert ".item()" in peers.IMPLS["liger-kernel"].not_capturable
    host_sync = dataclasses.replace(peers.IMPLS["torchtitan-style"], not_capturable="a host sync per call")
    assert peers.why_not(host_sync, case, "fwd", named=True, cuda_graphs=True) == ("skipped", "a host sync per call")
    assert peers.why_not(host_sync, case, "fwd", named=True) is None  # eager: it runs
    assert peers.why_not(host_sync, case, "fwdbwd", named=True, cuda_graphs=True) is None  # graphs time forwards
    assert peers.why_not(peers.IMPLS["torchtitan-style"], case, "fwd", named=True, cuda_graphs=True) is None
    # A reason of its own comes first: the capture note is only for calls it could otherwise run.
    bias_case = _small_case("gpt-oss-20b", 4)
    no_bias = dataclasses.replace(host_sync, reason=lambda case, mode: ("unsupported", "biases"))
    assert peers.why_not(no_bias, bias_case, "fwd", named=True, cuda_graphs=True) == ("unsupported", "biases")


def test_several_token_counts_give_one_case_each(tmp_path, fast_cpu_timer):
    json_path = tmp_path / "t.json"
    assert peers.main(["--small", "--device", "cpu", "--preset", "olmoe-1b-7b", "--tokens", "1", "3", "1",
                       "--impl", "torchtitan-style", "leanmoe-grouped_mm", "--mode", "fwd", "--json",
                       str(json_path)]) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["tokens"], r["impl"]) for r in rows] == [
        (T, impl) for T in (1, 3) for impl in ("torchtitan-style", "leanmoe-grouped_mm")]
    assert all(r["status"] == "ok" and r["check_ok"] for r in rows)
    with pytest.raises(SystemExit):
        peers.main(["--small", "--device", "cpu", "--tokens", "4", "0"])


def test_the_forward_baseline_is_auto_where_it_ran():
    def row(impl, mode, ms):
        return {"label": "p", "tokens": 64, "routing": "uniform", "mode": mode, "impl": impl, "backend": impl,
                "ms": ms, "frac_dense": None}

    rows = [row("leanmoe-triton-s0", "fwd", 2.0), row("leanmoe-auto", "fwd", 1.0), row("moe-ops", "fwd", 1.5),
            row("leanmoe-triton-s0", "fwdbwd", 4.0), row("leanmoe-auto", "fwdbwd", 1.0), row("moe-ops", "fwdbwd", 5.0),
            row("leanmoe-triton-s0", "fwd", 2.0) | {"tokens": 1}, row("moe-ops", "fwd", 1.0) | {"tokens": 1}]
    peers.add_ratios(rows)
    assert [r["vs_leanmoe"] for r in rows] == [0.5, 1.0, pytest.approx(1 / 1.5), 1.0, 4.0, 0.8, 1.0, 2.0]
    fwd64, bwd64, fwd1 = peers.summary(rows)
    assert fwd64["leanmoe"] == "leanmoe-auto" and fwd64["ratio"] == pytest.approx(1.5)
    assert bwd64["leanmoe"] == "leanmoe-triton-s0" and bwd64["ratio"] == pytest.approx(1.25)
    assert fwd1["leanmoe"] == "leanmoe-triton-s0" and fwd1["ratio"] == pytest.approx(0.5)


def test_plot_is_written(cpu_run, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "peers.png"
    assert peers.main(["--from-json", str(cpu_run[4] / "peers.json"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_every_impl_passes_its_check_on_the_gpu(tmp_path, monkeypatch):
    # A correctness check: liger-kernel untuned (read when it is first imported), leanmoe as the suite sets it.
    monkeypatch.setenv("LIGER_FUSED_MOE_AUTOTUNE", "0")
    json_path = tmp_path / "peers.json"
    assert peers.main(["--small", "--check-only", "--preset", "qwen3-30b-a3b", "gpt-oss-20b-native", "--json",
                       str(json_path)]) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert len(rows) == 2 * 2 * len(peers.default_impls(cuda_graphs=False))
    engine_variants = {name for name, impl in peers.IMPLS.items() if impl.backward_engine is not None}
    assert engine_variants
    for row in rows:
        if row["status"] in ("not installed", "unsupported"):
            assert row["impl"] in ("moe-ops", "liger-kernel", "transformers-batched_mm"), row
            continue
        if row["status"] == "skipped":  # a backward-engine variant has no forward of its own
            assert row["impl"] in engine_variants and row["mode"] == "fwd", row
            continue
        assert row["status"] == "ok" and row["check_ok"], row
