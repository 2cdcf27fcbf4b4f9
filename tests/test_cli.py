"""``leanmoe bench | verify | info`` end to end on the CPU, through ``leanmoe.cli.main``.

Runs use the CPU-scaled default preset at a few tokens, and a shortened CPU timer, so the file takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import uuid

import pytest
import torch

from leanmoe.bench import PRESETS, harness
from leanmoe.cli import main
from leanmoe.experts import available_backends, get_backend, registry
from leanmoe.experts.registry import ExpertsBackend

ROW_FIELDS = {"preset", "label", "tokens", "routing", "mode", "backend", "status", "reason", "errors", "max_error",
              "tolerance", "ms", "tflops", "frac_dense", "peak_mem_mb", "act_mem_mb", "dtype", "device"}
TINY = ["--device", "cpu", "--tokens", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def quick_cpu_timer(monkeypatch):
    monkeypatch.setattr(harness, "CPU_WARMUP_RUNS", 1)
    monkeypatch.setattr(harness, "CPU_MIN_RUNS", 2)
    monkeypatch.setattr(harness, "CPU_TIME_BUDGET_S", 0.05)


class _DoubleGrad(torch.autograd.Function):
    """Identity forward, twice the gradient backward: a backend with a correct output and a wrong gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _TestBackend(ExpertsBackend):
    """grouped_mm with a deliberate fault; registered under a unique name and removed after the test."""

    def __init__(self, fault: str, auto_reason: str | None = None) -> None:
        self.name = f"test-{fault}-{uuid.uuid4().hex[:8]}"
        self.fault, self.auto_reason = fault, auto_reason

    def auto_unsupported_reason(self, call):
        return self.auto_reason

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                 activation, gate_up_layout, save_percent, token_mask=None):
        self.token_masks = [*getattr(self, "token_masks", []), token_mask]
        if self.fault == "raises":
            raise RuntimeError("kernel exploded")
        if self.fault == "grad":
            down_proj = _DoubleGrad.apply(down_proj)
        if self.fault == "ignores-mask":
            token_mask = None
        mask = {} if token_mask is None else {"token_mask": token_mask}
        y_TD = get_backend("grouped_mm")(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                         down_bias, activation=activation, gate_up_layout=gate_up_layout,
                                         save_percent=save_percent, **mask)
        return y_TD * 1.5 if self.fault == "output" else y_TD


@pytest.fixture
def register(monkeypatch):
    available_backends()  # load the built-in backends first

    def add(backend: ExpertsBackend) -> str:
        # The registry has no unregister; monkeypatch removes the entry after the test.
        monkeypatch.setitem(registry._BACKENDS, backend.name, backend)
        return backend.name

    return add


def _rows(path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def test_bench_end_to_end_writes_json_markdown_and_plot(tmp_path, capsys):
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    argv = ["bench", *TINY, "--backend", "grouped_mm", "--routing", "uniform", "skewed", "--json", str(out_json),
            "--markdown", str(out_md)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(out_png)]
    assert main(argv) == 0
    payload = json.loads(out_json.read_text())
    rows = payload["rows"]
    assert [(r["routing"], r["mode"]) for r in rows] == [("uniform", "fwd"), ("uniform", "fwdbwd"),
                                                          ("skewed", "fwd"), ("skewed", "fwdbwd")]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["status"] == "ok" and row["label"] == "qwen3-30b-a3b (CPU-scaled)" and row["tokens"] == 16
        assert row["ms"] > 0 and row["tflops"] > 0 and row["max_error"] <= row["tolerance"] == 1e-4
        assert row["peak_mem_mb"] is None  # measured on CUDA only
    assert set(rows[1]["errors"]) == {"out", "grad_x", "grad_topk_weights", "grad_gate_up_proj", "grad_down_proj"}
    env = payload["env"]
    assert env["command"] == "leanmoe " + " ".join(argv[0:])
    assert {"device", "torch", "triton", "leanmoe", "git_commit", "source_sha256", "date"} <= set(env)
    printed = capsys.readouterr().out
    assert "leanmoe bench" in printed and "command: leanmoe bench" in printed and "grouped_mm" in printed
    for path in [out_json, out_md] + ([out_png] if "--plot" in argv else []):
        assert f"wrote {path}" in printed.splitlines()  # each file written is named on stdout
    assert f"source {env['source_sha256']}" in printed  # the printed environment names the code that ran
    markdown = out_md.read_text()
    assert markdown.startswith("## leanmoe bench") and env["command"] in markdown and "| preset |" in markdown
    if "--plot" in argv:
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cpu_default_leaves_out_what_does_not_run_here_and_says_why(tmp_path, register, capsys):
    passed_over = register(_TestBackend("none", auto_reason="test: auto passes over it"))
    out_json = tmp_path / "b.json"
    assert main(["verify", *TINY, "--mode", "fwd", "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    rows = {r["backend"]: r for r in payload["rows"]}
    assert "reference" not in rows, "the reference is timed only when named"
    assert rows["grouped_mm"]["status"] == "ok"
    # Every row ran: nothing that only runs in the Triton interpreter or that auto passes over is listed.
    assert all(r["status"] == "ok" for r in rows.values()) and passed_over not in rows
    triton_backends = [b for b in available_backends() if "triton" in get_backend(b).requires]
    assert triton_backends and not set(triton_backends) & set(rows)
    (note,) = [n for n in payload["env"]["notes"] if n.startswith("left out of the CPU default")]
    assert f"{passed_over}: test: auto passes over it" in note
    assert all(name in note for name in triton_backends) and "Triton kernels run only in its interpreter" in note
    assert note in capsys.readouterr().out.splitlines()  # one line, printed with the table
    # Named, they run.
    assert main(["verify", *TINY, "--mode", "fwd", "--backend", passed_over, "--json", str(out_json)]) == 0
    assert _rows(out_json)[0]["status"] == "ok"
    assert not any(n.startswith("left out") for n in json.loads(out_json.read_text())["env"]["notes"])


def test_the_cpu_table_reads_at_a_glance(tmp_path, register, capsys):
    other = register(_TestBackend("none"))
    assert main(["bench", *TINY, "--mode", "fwd", "--backend", "grouped_mm", other]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = next(line for line in lines if line.startswith("measured: "))
    assert "qwen3-30b-a3b (D=256, I=128, E=16, K=4, CPU-scaled) at T=16" in summary
    assert f"backends grouped_mm, {other}" in summary and "float32 on the CPU" in summary
    header = next(i for i, line in enumerate(lines) if line.startswith("preset "))
    assert "GFLOP/s" in lines[header] and "TFLOP/s" not in lines[header]  # a CPU reaches thousandths of a TFLOP/s
    table = lines[header:header + 4]
    # Numbers right-aligned: each number column ends where its header ends, in every row.
    for name in ("ms", "GFLOP/s", "x grouped_mm", "max rel err"):
        end = table[0].index(name) + len(name)
        for line in table[2:]:
            assert line[end - 1] != " " and (len(line) == end or line[end] == " "), (name, line)
    # A speedup column only because another backend ran beside grouped_mm.
    assert main(["bench", *TINY, "--mode", "fwd", "--backend", "grouped_mm"]) == 0
    assert "x grouped_mm" not in capsys.readouterr().out


def _png_height(path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk: width, then height


def test_the_cpu_plot_has_no_empty_memory_panel(tmp_path):
    pytest.importorskip("matplotlib")
    out_png, out_json = tmp_path / "cpu.png", tmp_path / "cpu.json"
    assert main(["bench", *TINY, "--mode", "fwd", "--backend", "grouped_mm", "--plot", str(out_png), "--json",
                 str(out_json)]) == 0
    assert _png_height(out_png) == 6 * 120  # the speed panel alone; a two-panel chart is 10 in high at 120 dpi
    assert main(["bench", "--from-json", str(out_json), "--plot", str(out_png)]) == 0
    assert _png_height(out_png) == 6 * 120


def test_a_wrong_backend_is_failed_not_timed_and_the_exit_code_says_so(tmp_path, register, capsys):
    wrong = register(_TestBackend("output"))
    out_json = tmp_path / "b.json"
    assert main(["bench", *TINY, "--backend", "grouped_mm", wrong, "--json", str(out_json)]) == 1
    rows = {(r["backend"], r["mode"]): r for r in _rows(out_json)}
    for mode in ("fwd", "fwdbwd"):
        row = rows[wrong, mode]
        assert row["status"] == "FAILED" and row["ms"] is None and row["tflops"] is None
        assert row["reason"].startswith("out relative error")
        assert rows["grouped_mm", mode]["status"] == "ok" and rows["grouped_mm", mode]["ms"] > 0
    assert "FAILED" in capsys.readouterr().out


def test_a_wrong_gradient_fails_fwdbwd_only(tmp_path, register):
    wrong = register(_TestBackend("grad"))
    out_json = tmp_path / "b.json"
    assert main(["bench", *TINY, "--backend", wrong, "--json", str(out_json)]) == 1
    fwd, fwdbwd = _rows(out_json)
    assert fwd["status"] == "ok" and fwd["ms"] > 0
    assert fwdbwd["status"] == "FAILED" and fwdbwd["ms"] is None
    assert fwdbwd["reason"].startswith("grad_down_proj relative error")


def test_a_backend_that_raises_is_failed_with_its_error(tmp_path, register):
    broken = register(_TestBackend("raises"))
    out_json = tmp_path / "b.json"
    assert main(["verify", *TINY, "--backend", broken, "--json", str(out_json)]) == 1
    assert all(r["status"] == "FAILED" and r["reason"] == "RuntimeError: kernel exploded" for r in _rows(out_json))


def test_verify_checks_without_timing(tmp_path):
    out_json = tmp_path / "v.json"
    argv = ["verify", *TINY, "--preset", "gpt-oss-20b-native", "--backend", "grouped_mm", "reference", "--json",
            str(out_json)]
    assert main(argv) == 0
    rows = _rows(out_json)
    assert len(rows) == 4 and all(r["status"] == "ok" and r["ms"] is None for r in rows)
    assert set(rows[1]["errors"]) >= {"grad_gate_up_bias", "grad_down_bias"}


def test_preset_all_runs_every_preset_scaled_on_the_cpu(tmp_path):
    out_json = tmp_path / "all.json"
    assert main(["verify", "--device", "cpu", "--tokens", "8", "--preset", "all", "--backend", "grouped_mm", "--mode",
                 "fwd", "--json", str(out_json)]) == 0
    rows = _rows(out_json)
    assert [r["preset"] for r in rows] == list(PRESETS)
    assert all(r["label"].endswith("(CPU-scaled)") and r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("flag", [["--mode", "decode"], ["--decode"], ["--mode", "decode", "fwd"]],
                         ids=["mode-decode", "decode-alias", "decode-and-fwd"])
def test_decode_is_the_forward_over_the_decode_token_counts_with_bandwidth(flag, tmp_path, capsys):
    from leanmoe.bench.presets import DECODE_TOKENS

    out_json = tmp_path / "d.json"
    assert main(["bench", "--device", "cpu", *flag, "--backend", "grouped_mm", "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    rows = payload["rows"]
    assert DECODE_TOKENS == (1, 4, 16, 64, 256)
    assert [r["tokens"] for r in rows] == list(DECODE_TOKENS)
    assert all(r["mode"] == "fwd" and r["decode"] and r["status"] == "ok" for r in rows)
    # The copy rate is measured in the same run, on the CPU too, and each row's bandwidth is compared with it.
    assert payload["env"]["copy_gbps"] > 0
    for row in rows:
        assert row["gbps"] == pytest.approx(row["weight_bytes"] / (row["ms"] * 1e-3) / 1e9)
        assert row["frac_copy"] == pytest.approx(row["gbps"] / payload["env"]["copy_gbps"])
    # One token touches its K experts' weights, each once (fp32 here).
    assert rows[0]["weight_bytes"] == _scaled_default().top_k * _scaled_default().expert_bytes(4)
    out = capsys.readouterr().out
    assert "% copy" in out and "GB/s" in out and "decode (fwd)" in out and "T=1/4/16/64/256" in out


def test_decode_with_tokens_runs_those_counts(tmp_path):
    out_json = tmp_path / "d.json"
    assert main(["verify", "--device", "cpu", "--mode", "decode", "--tokens", "2", "7", "--backend", "grouped_mm",
                 "--preset", "gpt-oss-20b-native", "--json", str(out_json)]) == 0
    rows = _rows(out_json)
    assert [(r["tokens"], r["mode"], r["status"]) for r in rows] == [(2, "fwd", "ok"), (7, "fwd", "ok")]


def test_decode_is_forward_only(capsys, no_work):
    assert "cannot be combined with fwdbwd" in _usage_error(capsys, ["bench", *TINY, "--mode", "decode", "fwdbwd"])
    assert "cannot be combined with fwdbwd" in _usage_error(capsys, ["bench", *TINY, "--decode", "--mode",
                                                                     "fwdbwd"])


def test_hf_takes_one_token_count(capsys, no_work):
    assert "--hf takes one --tokens count" in _usage_error(capsys, ["bench", "--device", "cpu", "--hf", "mixtral",
                                                                    "--tokens", "4", "8"])


def test_hf_decode_runs_the_decode_bench(monkeypatch, capsys):
    import leanmoe.bench.hf
    import leanmoe.cli

    calls = []

    def fake_decode(model_type, *, device, dtype, layers, batch, compiled, backends):
        calls.append((model_type, device.type, layers, batch, compiled))
        return [dict(model_type=model_type, implementation="leanmoe:auto", mode="decode", ms=2.0, tokens_per_s=500.0,
                     peak_mem_mb=None, ok=True, rel_err=1e-6, note="")]

    monkeypatch.setattr(leanmoe.cli, "_load_hf_bench", lambda: lambda *a, **k: pytest.fail("not the decode bench"))
    monkeypatch.setattr(leanmoe.bench.hf, "run_hf_decode_bench", fake_decode)
    assert main(["bench", "--device", "cpu", "--hf", "mixtral", "--mode", "decode", "--tokens", "3"]) == 0
    assert calls == [("mixtral", "cpu", 2, 3, False)]
    out = capsys.readouterr().out
    assert "tokens/s" in out and "500" in out
    assert "greedy generate() runs" in out and "do_bench" not in out  # the timer line names what was timed
    assert "; eager" in out
    # --cuda-graphs asks for the compiled generate(), which needs CUDA.
    assert "--cuda-graphs needs a CUDA device" in _usage_error(capsys, [
        "bench", "--device", "cpu", "--hf", "mixtral", "--mode", "decode", "--cuda-graphs"])
    assert len(calls) == 1


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "qwen3-30b-a3b (CPU-scaled)" in out and "auto picked" in out
    for name in available_backends():
        assert name in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--preset", "nope"], "unknown preset"),
    (["bench", "--backend", "nope"], "unknown backend"),
    (["bench", "--mode", "bwd"], "invalid choice: 'bwd'"),
    (["bench", "--routing", "zipf"], "invalid choice: 'zipf'"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["bench", "--tokens", "0"], "--tokens must be >= 1"),
    (["verify", "--save-percent", "101"], r"--save-percent must be in \[0, 100\]"),
    (["info", "--preset", "nope"], "unknown preset"),
    ([], "required"),
], ids=["preset", "backend", "mode", "routing", "dtype", "tokens", "save-percent", "info-preset", "no-command"])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_missing_optional_packages_name_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "matplotlib") else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"pip install 'leanmoe\[hf\]'"):
        main(["bench", *TINY, "--hf", "qwen3_moe"])
    with pytest.raises(SystemExit, match=r"pip install 'leanmoe\[bench\]'"):
        main(["bench", *TINY, "--plot", "x.png"])


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "leanmoe", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "auto picked" in done.stdout


def test_hf_bench_runs_alone_and_its_failures_set_the_exit_code(tmp_path, monkeypatch, capsys):
    import leanmoe.cli

    calls = []

    def fake_run_hf_bench(model_type, *, device, dtype, tokens, layers, save_percent, json_path=None):
        calls.append((model_type, device.type, dtype, tokens, layers, save_percent))
        ok = model_type != "bad"
        return [dict(model_type=model_type, implementation="leanmoe:auto", mode="train", ms=1.0, peak_mem_mb=None,
                     ok=ok, rel_err=1e-6, note=""),
                dict(model_type=model_type, implementation="batched_mm", mode="train", ms=None, peak_mem_mb=None,
                     ok=False, rel_err=None, note="skipped: too big")]

    monkeypatch.setattr(leanmoe.cli, "_load_hf_bench", lambda: fake_run_hf_bench)
    out_json = tmp_path / "hf.json"
    assert main(["bench", "--device", "cpu", "--hf", "qwen3_moe", "--hf-layers", "1", "--save-percent", "100",
                 "--json", str(out_json)]) == 0
    assert calls == [("qwen3_moe", "cpu", torch.float32, 64, 1, 100.0)]
    payload = json.loads(out_json.read_text())
    assert payload["rows"] == [] and len(payload["hf_rows"]) == 2
    assert "leanmoe:auto" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--hf", "mixtral"]) == 0
    monkeypatch.setattr(leanmoe.cli, "_load_hf_bench", lambda: lambda *a, **k: fake_run_hf_bench("bad", **k))
    assert main(["bench", "--device", "cpu", "--hf", "mixtral"]) == 1


def test_source_digest_names_the_code(tmp_path):
    from leanmoe.bench.env import source_digest

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not source")
    first = source_digest(pkg)
    assert len(first) == 12 and first == source_digest(pkg)
    (pkg / "notes.txt").write_text("changed, but not source")
    assert source_digest(pkg) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest(pkg) != first
    (pkg / "sub" / "b.py").rename(pkg / "b2.py")  # the same bytes under another name are other code
    assert source_digest(pkg) != first
    assert len(source_digest()) == 12  # leanmoe itself


def test_plot_draws_memory_when_there_is_some(tmp_path):
    pytest.importorskip("matplotlib")
    from leanmoe.bench.plot import write_plot

    def row(backend, mode, tflops, peak, act, status="ok"):
        return dict(label="qwen3-30b-a3b", tokens=16384, routing="uniform", mode=mode, backend=backend,
                    status=status, tflops=tflops, peak_mem_mb=peak, act_mem_mb=act)

    rows = [row("grouped_mm", "fwd", 300.0, 900.0, None), row("triton", "fwd", 500.0, 300.0, None),
            row("grouped_mm", "fwdbwd", 250.0, 9000.0, 4200.0), row("triton", "fwdbwd", None, None, None, "FAILED")]
    env = {"device": "NVIDIA H100", "torch": "2.x", "cuda": "12.8", "triton": "3.x", "leanmoe": "0.1.0",
           "git_commit": "abc", "date": "today", "command": "leanmoe bench", "dense_tflops": 700.0}
    write_plot(tmp_path / "p.png", rows, env)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert _png_height(tmp_path / "p.png") == 10 * 120  # the GPU chart keeps its memory panel


def test_from_json_merges_earlier_runs(tmp_path, capsys):
    first, second, merged_md = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.md"
    assert main(["bench", *TINY, "--backend", "grouped_mm", "--mode", "fwd", "--json", str(first)]) == 0
    assert main(["bench", *TINY, "--backend", "grouped_mm", "--mode", "fwd", "--routing", "skewed", "--json",
                 str(second)]) == 0
    capsys.readouterr()
    assert main(["bench", "--from-json", str(first), str(second), "--markdown", str(merged_md)]) == 0
    text = merged_md.read_text()
    assert "--json " + str(first) in text and "--json " + str(second) in text and "merged from 2 runs" in text
    assert "| skewed |" in text and "| uniform |" in text


@pytest.mark.gpu
def test_bench_on_the_gpu_measures_rates_and_memory(tmp_path):
    # Full qwen3-30b-a3b dims at a few hundred tokens: every CUDA-only figure (dense rate, copy rate, memory) is set.
    out_json = tmp_path / "gpu.json"
    argv = ["bench", "--device", "cuda", "--tokens", "512", "--backend", "grouped_mm", "--json", str(out_json)]
    assert main(argv) == 0
    payload = json.loads(out_json.read_text())
    assert payload["env"]["dense_tflops"] > 0 and "NVIDIA" in payload["env"]["device"]
    fwd, fwdbwd = payload["rows"]
    assert fwd["label"] == "qwen3-30b-a3b" and fwd["dtype"] == "bfloat16" and fwd["tolerance"] == 2e-2
    for row in (fwd, fwdbwd):
        assert row["status"] == "ok" and row["ms"] > 0 and 0 < row["frac_dense"] and row["peak_mem_mb"] > 0
    assert fwd["act_mem_mb"] is None and fwdbwd["act_mem_mb"] < fwdbwd["peak_mem_mb"]

    assert main(["bench", "--device", "cuda", "--mode", "decode", "--backend", "grouped_mm", "--json",
                 str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    assert [r["tokens"] for r in payload["rows"]] == [1, 4, 16, 64, 256]
    assert payload["env"]["copy_gbps"] > 0
    for row in payload["rows"]:
        assert row["status"] == "ok" and row["gbps"] > 0 and 0 < row["frac_copy"] < 1.5


# ------------------------------------------------------------------------------------- user mistakes, late failures


def _usage_error(capsys, argv) -> str:
    """Runs ``main(argv)``, expects a usage error (exit status 2) and returns its one-line message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a run starts measuring: errors must come before any work."""
    import leanmoe.cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(leanmoe.cli, "run_plan", must_not_run)


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
@pytest.mark.parametrize("where, message", [
    ("dir", "is a directory"),
    ("missing/out.x", "does not exist"),
    ("a_file/out.x", "is not a directory"),
], ids=["is-a-directory", "missing-parent", "parent-is-a-file"])
def test_output_paths_are_checked_before_any_work(flag, where, message, tmp_path, capsys, no_work):
    (tmp_path / "dir").mkdir()
    (tmp_path / "a_file").write_text("")
    err = _usage_error(capsys, ["bench", *TINY, flag, str(tmp_path / where)])
    assert flag in err and message in err


def test_an_unwritable_output_path_is_a_usage_error(capsys, no_work):
    # /sys refuses new files even to root, for whom permission bits alone would allow anything.
    try:
        open("/sys/leanmoe-test.json", "a").close()
    except OSError:
        pass
    else:
        pytest.skip("/sys is writable here")
    err = _usage_error(capsys, ["bench", *TINY, "--json", "/sys/leanmoe-test.json"])
    assert "--json '/sys/leanmoe-test.json' cannot be written" in err


def test_one_file_for_two_outputs_is_a_usage_error(tmp_path, capsys, no_work):
    same = str(tmp_path / "out")
    assert "name the same file" in _usage_error(capsys, ["bench", *TINY, "--json", same, "--markdown", same])


def test_the_output_check_leaves_no_file_behind(tmp_path, no_work):
    # The writability probe creates a missing file and removes it: --markdown passes, then --plot fails.
    out_md = tmp_path / "m.md"
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--markdown", str(out_md), "--plot", str(tmp_path)])
    assert not out_md.exists()


def test_an_unknown_hf_model_type_is_a_usage_error(capsys, no_work):
    err = _usage_error(capsys, ["bench", "--device", "cpu", "--hf", "nope"])
    assert "--hf: unknown model type 'nope'" in err and "qwen3_moe" in err


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read: No such file"),
    ("dir", "cannot be read: Is a directory"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a leanmoe bench --json file"),
    ('{"env": {"device": "x"}, "rows": []}', "its env lacks torch"),
    ('{"env": {"device": "d", "torch": "t", "triton": null, "leanmoe": "l", "date": "d", "command": "c"}, '
     '"rows": [{"label": "x"}]}', "row 0 is not a bench row"),
], ids=["missing", "directory", "not-json", "not-an-object", "env-keys", "row-keys"])
def test_a_bad_from_json_file_is_a_usage_error(content, message, tmp_path, capsys):
    path = tmp_path / "in.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    err = _usage_error(capsys, ["bench", "--from-json", str(path)])
    assert f"--from-json: {str(path)!r}" in err and message in err


def test_a_value_error_from_leanmoe_is_a_usage_error(monkeypatch, capsys):
    import leanmoe.cli

    def refuse(*args, **kwargs):
        raise ValueError("activation 'swiglu' needs gate_up_proj [E, 2I, D], got [E, I, D]")

    monkeypatch.setattr(leanmoe.cli, "run_plan", refuse)
    assert "error: activation 'swiglu' needs gate_up_proj" in _usage_error(capsys, ["bench", *TINY])


@pytest.mark.parametrize("cause, status", [(RuntimeError("out of memory"), 1), (KeyboardInterrupt(), 130),
                                           (ValueError("late"), 1)], ids=["error", "ctrl-c", "value-error"])
def test_a_run_that_fails_late_keeps_what_it_measured(cause, status, tmp_path, monkeypatch, capsys):
    make_case = harness.make_case

    def fail_on_the_second_case(preset, routing, *args, **kwargs):
        if routing == "skewed":
            raise cause
        return make_case(preset, routing, *args, **kwargs)

    monkeypatch.setattr(harness, "make_case", fail_on_the_second_case)
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(["bench", *TINY, "--backend", "grouped_mm", "--mode", "fwd", "--routing", "uniform", "skewed",
                 "--json", str(out_json), "--markdown", str(out_md)]) == status
    out, err = capsys.readouterr()
    (row,) = _rows(out_json)
    assert row["routing"] == "uniform" and row["status"] == "ok" and row["ms"] > 0
    assert "| uniform |" in out_md.read_text() and "incomplete run" in out_md.read_text()
    assert f"wrote {out_json}" in out and f"wrote {out_md}" in out and "grouped_mm" in out
    assert "after 1 row(s)" in err and "Traceback" not in err


def test_ctrl_c_before_the_first_row_exits_130_without_a_traceback(monkeypatch, capsys):
    import leanmoe.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run_env = leanmoe.cli._run_env
    monkeypatch.setattr(leanmoe.cli, "_run_env", interrupted)  # before the run starts
    assert main(["bench", *TINY]) == 130
    assert capsys.readouterr().err.strip() == "leanmoe bench: interrupted before any row was measured"
    monkeypatch.setattr(leanmoe.cli, "_run_env", run_env)
    monkeypatch.setattr(leanmoe.cli, "run_plan", interrupted)  # in the first row
    assert main(["bench", *TINY]) == 130
    err = capsys.readouterr().err
    assert "leanmoe bench: interrupted after 0 row(s)" in err and "Traceback" not in err


def test_a_usage_error_prints_no_traceback_from_the_console(tmp_path):
    done = subprocess.run([sys.executable, "-m", "leanmoe", "bench", "--json", str(tmp_path / "no" / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ --mask-fraction


def test_mask_fraction_masks_tokens_and_counts_only_the_kept_ones(tmp_path, register, capsys):
    from leanmoe.bench.presets import flops

    recorder = register(_TestBackend("none"))
    out_json = tmp_path / "m.json"
    assert main(["bench", "--device", "cpu", "--tokens", "4", "--mask-fraction", "0.5", "--backend", recorder,
                 "--decode", "--json", str(out_json)]) == 0
    (row,) = _rows(out_json)
    assert row["status"] == "ok" and row["mask_fraction"] == 0.5 and row["tokens"] == 4 and row["kept_tokens"] == 2
    # The timed calls got the mask: a [T] bool tensor keeping 2 of 4 tokens, the same one every call.
    masks = get_backend(recorder).token_masks
    assert all(m is not None and m.dtype == torch.bool and m.shape == (4,) for m in masks)
    assert int(masks[0].sum()) == 2 and all(torch.equal(m, masks[0]) for m in masks)
    # FLOPs and weight bytes count the kept tokens only.
    kept_flops = row["tflops"] * 1e12 * row["ms"] * 1e-3
    assert kept_flops == pytest.approx(flops(_scaled_default(), 2, "fwd"), rel=1e-6)
    case = harness.make_case(_scaled_default(), "uniform", 4, dtype=torch.float32, device=torch.device("cpu"),
                             mask_fraction=0.5)
    assert torch.equal(case.token_mask_T, masks[0])
    kept_experts = torch.unique(case.topk_ids_TK[case.token_mask_T]).numel()
    assert kept_experts < torch.unique(case.topk_ids_TK).numel()  # else the byte count below could not tell
    assert row["weight_bytes"] == kept_experts * _scaled_default().expert_bytes(4)
    out = capsys.readouterr().out
    assert "masked" in out and "50%" in out and "kept tokens only" in out


def _scaled_default():
    from leanmoe.bench import DEFAULT_PRESET, cpu_scaled

    return cpu_scaled(PRESETS[DEFAULT_PRESET])


def test_a_backend_that_ignores_the_mask_fails_the_check(tmp_path, register):
    ignores = register(_TestBackend("ignores-mask"))
    out_json = tmp_path / "m.json"
    assert main(["verify", *TINY, "--mask-fraction", "0.25", "--backend", "grouped_mm", ignores, "--json",
                 str(out_json)]) == 1
    rows = {(r["backend"], r["mode"]): r for r in _rows(out_json)}
    assert rows["grouped_mm", "fwd"]["status"] == rows["grouped_mm", "fwdbwd"]["status"] == "ok"
    assert rows[ignores, "fwd"]["status"] == "FAILED" and rows[ignores, "fwd"]["reason"].startswith("out ")


def test_no_mask_by_default(tmp_path, register, capsys):
    recorder = register(_TestBackend("none"))
    assert main(["verify", *TINY, "--mode", "fwd", "--backend", recorder]) == 0
    assert get_backend(recorder).token_masks and all(m is None for m in get_backend(recorder).token_masks)
    assert "masked" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "1.5"])
def test_mask_fraction_outside_0_1_is_a_usage_error(value, capsys, no_work):
    assert "--mask-fraction must be in [0, 1)" in _usage_error(capsys, ["bench", *TINY, "--mask-fraction", value])


# --------------------------------------------------------------------------------------------------- --lora

LORA_TINY = ["bench", "--lora", "4", "--preset", "qwen3-30b-a3b", *TINY]
LORA_GRADS = {"grad_gate_up_A", "grad_gate_up_B", "grad_down_A", "grad_down_B"}


def test_lora_bench_runs_on_the_cpu_against_the_frozen_layer_without_adapters(tmp_path, capsys):
    out_json = tmp_path / "l.json"
    assert main([*LORA_TINY, "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    assert payload["env"]["lora_rank"] == 4
    rows = payload["rows"]
    base, *lora_rows = rows
    # The baseline: the same frozen layer without adapters, on auto's pick here (triton needs a GPU).
    assert (base["lora_rank"], base["status"], base["mode"]) == (0, "ok", "fwdbwd")
    assert set(base["errors"]) == {"out", "grad_x", "grad_topk_weights"}
    # auto resolves to grouped_mm for the LoRA call, so grouped_mm runs once; the reference runs on the CPU.
    assert [r["backend"] for r in lora_rows] == ["grouped_mm", "reference"]
    for row in lora_rows:
        assert (row["lora_rank"], row["lora_alpha"], row["status"], row["mode"]) == (4, 8.0, "ok", "fwdbwd")
        assert set(row["errors"]) == {"out", "grad_x", "grad_topk_weights"} | LORA_GRADS
        assert row["max_error"] <= row["tolerance"]
        assert row["baseline_backend"] == base["backend"] and row["baseline_ms"] == base["ms"] > 0
        assert row["lora_ratio"] == pytest.approx(row["ms"] / base["ms"])
        assert row["tflops"] is None and row["act_mem_mb"] is None  # no FLOP rate; memory on CUDA only
    out = capsys.readouterr().out
    assert "LoRA" in out and "r=4" in out and "none" in out and "x no-LoRA" in out
    assert "LoRA rank 4 (base frozen)" in out


def test_lora_verify_checks_without_timing(tmp_path):
    out_json = tmp_path / "v.json"
    assert main(["verify", "--lora", "2", "--preset", "mixtral-8x7b", *TINY, "--mode", "fwd", "fwdbwd",
                 "--json", str(out_json)]) == 0
    rows = _rows(out_json)
    assert [(r["mode"], r["lora_rank"]) for r in rows] == [("fwd", 0), ("fwd", 2), ("fwd", 2), ("fwdbwd", 0),
                                                           ("fwdbwd", 2), ("fwdbwd", 2)]
    assert all(r["status"] == "ok" and r["ms"] is None for r in rows)
    assert set(rows[1]["errors"]) == {"out"}


def _wrong_lora(monkeypatch, fault: str) -> None:
    """grouped_mm's LoRA path with a fault: a 1% larger output, or a wrong down_B gradient (output unchanged)."""
    import leanmoe.lora.compute as compute

    original = compute.grouped_mm_lora_experts

    def wrong(*args, lora, **kwargs):
        y_TD = original(*args, lora=lora, **kwargs)
        if fault == "output":
            return y_TD * 1.01
        s = lora.down_B.sum()
        return y_TD + 0.01 * (s - s.detach())  # adds exactly 0 forward, 0.01 * sum(dy) to each down_B gradient

    monkeypatch.setattr(compute, "grouped_mm_lora_experts", wrong)


@pytest.mark.parametrize("fault, tensor", [("output", "out"), ("grad", "grad_down_B")])
def test_a_wrong_lora_compute_is_failed_not_timed(fault, tensor, tmp_path, monkeypatch, capsys):
    _wrong_lora(monkeypatch, fault)
    out_json = tmp_path / "l.json"
    assert main([*LORA_TINY, "--json", str(out_json)]) == 1
    by_backend = {(r["backend"], r["lora_rank"]): r for r in _rows(out_json)}
    bad = by_backend[("grouped_mm", 4)]
    assert bad["status"] == "FAILED" and bad["ms"] is None and bad["lora_ratio"] is None
    assert "relative error" in bad["reason"] and bad["errors"][tensor] > bad["tolerance"]
    if fault == "grad":  # only the down_B gradient is wrong, and that alone fails the row
        assert bad["reason"].startswith("grad_down_B relative error")
        assert all(e <= bad["tolerance"] for name, e in bad["errors"].items() if name != "grad_down_B")
    # The baseline (no adapters) and the reference loop do not go through the faulty path.
    assert by_backend[("grouped_mm", 0)]["status"] == by_backend[("reference", 4)]["status"] == "ok"
    assert "1 check(s) FAILED" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--lora", "0"], "--lora: RANK must be a positive int"),
    (["bench", "--lora", "-3"], "--lora: RANK must be a positive int"),
    (["bench", "--lora", "1.5"], "--lora: RANK must be a positive int"),
    (["bench", "--lora", "x"], "--lora: RANK must be a positive int"),
    (["bench", "--lora", "4", "--backend", "triton_decode", "--device", "cpu"], "'triton_decode' take no LoRA"),
    (["bench", "--lora", "4", "--mode", "decode", "--device", "cpu"], "cannot be combined with --mode decode"),
], ids=["zero", "negative", "float", "text", "triton_decode", "decode"])
def test_bad_lora_arguments_are_usage_errors(argv, message, capsys, no_work):
    assert message in _usage_error(capsys, argv)


@pytest.mark.gpu
def test_lora_bench_on_the_gpu_reports_ratios_and_activation_memory(tmp_path):
    out_json = tmp_path / "l.json"
    assert main(["bench", "--lora", "16", "--preset", "qwen3-30b-a3b", "--tokens", "2048", "--json",
                 str(out_json)]) == 0
    rows = _rows(out_json)
    assert rows[0]["backend"] == "triton" and rows[0]["lora_rank"] == 0 and rows[0]["act_mem_mb"] > 0
    assert [row["backend"] for row in rows[1:]] == ["triton", "grouped_mm"]  # auto's pick, then grouped_mm
    for row in rows[1:]:
        assert row["status"] == "ok" and row["lora_ratio"] > 0 and row["act_mem_ratio"] > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", *TINY, "--decode", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
], ids=["cpu"])
def test_bad_cuda_graph_arguments_are_usage_errors(argv, message, capsys, no_work):
    assert message in _usage_error(capsys, argv)


def test_the_decode_table_times_eagerly_off_cuda(tmp_path):
    # --cuda-graphs is the decode table's default on CUDA only; on the CPU the timer says eager perf_counter runs.
    out_json = tmp_path / "d.json"
    assert main(["bench", *TINY, "--decode", "--json", str(out_json)]) == 0
    env = json.loads(out_json.read_text())["env"]
    assert "CUDA-graph" not in env["timer"]


@pytest.mark.gpu
def test_the_decode_table_times_cuda_graph_replays_on_the_gpu(tmp_path):
    out_json = tmp_path / "d.json"
    assert main(["bench", "--decode", "--preset", "olmoe-1b-7b", "--tokens", "4", "--backend", "triton_decode",
                 "grouped_mm", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert "CUDA-graph replays" in data["env"]["timer"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["frac_copy"] > 0 for r in data["rows"])


def test_hf_lora_bench_compares_leanmoe_adapters_with_peft(tmp_path, monkeypatch):
    # --hf M --lora R: one train row for transformers + PEFT and one for leanmoe, both checked against the fp32
    # reference (tiny shapes, so the CPU runs it in seconds).
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import leanmoe.bench.hf_lora as hf_lora

    real = hf_lora.run_hf_lora_bench
    monkeypatch.setattr(hf_lora, "run_hf_lora_bench",
                        lambda *a, **k: real(*a, **k, config_overrides={"tiny": True}))
    out_json = tmp_path / "hf_lora.json"
    assert main(["bench", "--device", "cpu", "--hf", "qwen3_moe", "--hf-layers", "1", "--tokens", "16",
                 "--lora", "4", "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    rows = payload["hf_rows"]
    assert [r["implementation"] for r in rows] == ["transformers:grouped_mm+peft", "leanmoe:auto+ExpertLoRA"]
    assert all(r["ok"] and r["ms"] > 0 and r["rel_err"] < 1e-4 and r["lora_rank"] == 4 for r in rows)
    assert all(r["rel_err"] <= r["tol"] for r in rows)  # each row names the tolerance it passed
    # The notes describe the model comparison, not the expert-layer rows this run has none of.
    assert payload["env"]["notes"] and "PEFT" in payload["env"]["notes"][0] and "'none'" not in str(payload["env"])
