"""``auto`` by measurement (:mod:`leanmoe.experts.autoselect`), on the CPU with fake backends and fake timings.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.

The registry is replaced by one holding the reference loop and two fake backends (``slow_first``, the
higher-priority one, and ``fast_second``); the device check is patched to measure CPU calls and the timer returns
a fixed time per backend after running the timed function once.
"""

from __future__ import annotations

import json

import pytest
import torch

import leanmoe
from leanmoe.experts import autoselect, registry
from leanmoe.experts.functional import describe_call
from leanmoe.experts.reference import ReferenceBackend, reference_moe_experts
from leanmoe.experts.registry import ExpertsBackend, explain_backend
from tests.helpers import make_problem

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeBackend(ExpertsBackend):
    def __init__(self, name: str, priority: int, calls: list[str]):
        self.name, self.priority, self.calls = name, priority, calls

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                 activation, gate_up_layout, save_percent, token_mask=None):
        self.calls.append(self.name)
        return reference_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                     down_bias, activation=activation, gate_up_layout=gate_up_layout)


class Timer:
    def __init__(self, calls: list[str], times: dict[str, float]):
        self.calls, self.times, self.timed = calls, times, []

    def __call__(self, fn, device):
        before = len(self.calls)
        fn()  # the timed function must run (forward, or forward and backward)
        name = self.calls[before]
        self.timed.append(name)
        return self.times[name]


def measuring(monkeypatch, tmp_path, backends: dict, calls: list[str], times: dict[str, float]) -> Timer:
    """A registry of ``backends`` (plus the reference) that auto measures, on a fake GPU, with ``times``."""
    monkeypatch.setattr(registry, "_BACKENDS", {"reference": ReferenceBackend(), **backends})
    monkeypatch.setattr(autoselect, "can_measure", lambda device: True)
    monkeypatch.setattr(autoselect, "environment_key", lambda device: "Fake GPU | versions")
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autoselect.ENV_SWITCH, raising=False)
    timer = Timer(calls, times)
    monkeypatch.setattr(autoselect, "time_ms", timer)
    autoselect.clear_memory()
    return timer


@pytest.fixture
def fake(monkeypatch, tmp_path):
    calls: list[str] = []
    backends = {"slow_first": FakeBackend("slow_first", 100, calls),
                "fast_second": FakeBackend("fast_second", 99, calls)}
    yield measuring(monkeypatch, tmp_path, backends, calls, {"slow_first": 2.0, "fast_second": 1.0})
    autoselect.clear_memory()


def _problem(T=5, **kw):
    return make_problem(T, 16, 8, 4, 2, seed=T, **kw)


def _call(p):
    return describe_call(*p.args(), **p.kwargs())


def test_measures_once_and_takes_the_fastest(fake):
    p = _problem(requires_grad=False)
    assert "measures ['slow_first', 'fast_second']" in explain_backend(_call(p))
    y = leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == ["slow_first", "fast_second"]
    assert fake.calls[-1] == "fast_second", "the measured call runs the winner"
    torch.testing.assert_close(y, reference_moe_experts(*p.args(), **p.kwargs()))
    why = explain_backend(_call(p))
    assert "auto picked 'fast_second', measured fastest" in why
    assert "fast_second 1 ms, slow_first 2 ms" in why and "Fake GPU" in why
    # The same bucket (T=7 rounds up to 8 like T=5) is not measured again.
    leanmoe.moe_experts(*_problem(7, requires_grad=False).args(), **p.kwargs())
    assert fake.timed == ["slow_first", "fast_second"] and fake.calls[-1] == "fast_second"


@pytest.mark.parametrize("requires_grad", [False, True])
def test_no_grad_calls_are_timed_as_graph_replays(fake, monkeypatch, requires_grad):
    # A served (captured) step pays the device time; eager timing of a decode-sized call measures host launches.
    replays = []

    def replayed(fn, device):
        replays.append(device.type)
        return fn

    monkeypatch.setattr(autoselect, "replayed", replayed)
    p = _problem(requires_grad=requires_grad)
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == ["slow_first", "fast_second"]
    assert replays == ([] if requires_grad else ["cpu", "cpu"])


def test_replayed_keeps_the_call_off_cuda_and_where_capture_fails():
    def fn():
        return None

    assert autoselect.replayed(fn, torch.device("cpu")) is fn
    assert "CUDA-graph replays" in autoselect.METHOD


@pytest.mark.gpu
def test_replayed_is_a_graph_replay_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda")
    a = torch.randn(64, device=dev)
    out = torch.empty_like(a)

    def fn():
        torch.mul(a, 2, out=out)

    replay = autoselect.replayed(fn, dev)
    assert replay is not fn
    a.copy_(torch.arange(64.0, device=dev))
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2 * torch.arange(64.0, device=dev))

    def sync():  # a host sync cannot be captured: timed as it runs
        a.sum().item()

    assert autoselect.replayed(sync, dev) is sync


def test_measured_choice_is_memoised(fake, monkeypatch):
    # A decode step asks auto once per layer: a measured bucket's choice is derived once, then looked up.
    p = _problem(requires_grad=False)
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    call = _call(p)
    first = autoselect.choose(call)
    monkeypatch.setattr(autoselect, "candidates", lambda call: pytest.fail("the memo was not used"))
    assert autoselect.choose(call) == first and first[0].name == "fast_second"
    # A new measurement, another switch value or cache directory, or a new registry derives the choice again.
    monkeypatch.setenv(autoselect.ENV_SWITCH, "0")
    assert autoselect.choose(call) is None
    monkeypatch.delenv(autoselect.ENV_SWITCH)
    autoselect.record("Fake GPU | versions", "T1-other", autoselect.Measurement("slow_first", {"slow_first": 1.0}))
    with pytest.raises(pytest.fail.Exception, match="the memo was not used"):
        autoselect.choose(call)


def test_disk_cache(fake, tmp_path):
    p = _problem(requires_grad=False)
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    data = json.loads((tmp_path / autoselect.CACHE_FILE).read_text())
    (entry,) = data["entries"]["Fake GPU | versions"].values()
    assert entry == {"backend": "fast_second", "times_ms": {"slow_first": 2.0, "fast_second": 1.0}}
    autoselect.clear_memory()  # a new process: the choice comes from the disk, with no timing
    assert registry.select_backend("auto", _call(p))[0].name == "fast_second"
    assert len(fake.timed) == 2


def test_unreadable_disk_cache_warns(fake, tmp_path):
    (tmp_path / autoselect.CACHE_FILE).write_text("{not json")
    p = _problem(requires_grad=False)
    with pytest.warns(UserWarning, match="unreadable autoselect cache"):
        leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.calls[-1] == "fast_second"


def test_buckets():
    def key(T, **kw):
        return autoselect.bucket_key(_call(_problem(T, **kw)))

    assert key(5) == key(8) != key(9)
    assert key(1) != key(2)
    assert key(5, requires_grad=False) != key(5)
    assert key(5, activation="relu2") != key(5)
    assert key(5, bias=True) != key(5)
    assert "T8-E4-D16-I8-K2-float32-swiglu-concatenated-bias00-mask0-grad-save0" == key(5)
    assert [autoselect.token_bucket(t) for t in (0, 1, 2, 3, 64, 65)] == [0, 1, 2, 4, 64, 128]


def test_grad_calls_are_timed_with_backward(fake):
    p = _problem()
    y = leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == ["slow_first", "fast_second"]
    # The timed runs computed gradients through autograd.grad without touching .grad.
    assert all(t.grad is None for t in p.inputs())
    y.sum().backward()
    assert p.x_TD.grad is not None
    assert "grad-save0" in explain_backend(_call(p))


def test_switched_off(fake, monkeypatch):
    monkeypatch.setenv(autoselect.ENV_SWITCH, "0")
    p = _problem(requires_grad=False)
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == [] and fake.calls == ["slow_first"]
    assert "highest-priority" in explain_backend(_call(p))
    monkeypatch.setenv(autoselect.ENV_SWITCH, "yes")
    with pytest.raises(ValueError, match="LEANMOE_AUTOSELECT must be '0' or '1', got 'yes'"):
        leanmoe.moe_experts(*p.args(), **p.kwargs())


def test_never_measures_while_capturing(fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    p = _problem(requires_grad=False)
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == [] and fake.calls == ["slow_first"], "priority order while capturing"
    # A measurement made before the capture is used during it.
    autoselect.record("Fake GPU | versions", autoselect.bucket_key(_call(p)),
                      autoselect.Measurement("fast_second", {"slow_first": 2.0, "fast_second": 1.0}))
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == [] and fake.calls[-1] == "fast_second"


def test_a_new_candidate_is_measured(fake):
    p = _problem(requires_grad=False)
    # An old entry that timed only one of today's two candidates does not decide.
    autoselect.record("Fake GPU | versions", autoselect.bucket_key(_call(p)),
                      autoselect.Measurement("slow_first", {"slow_first": 2.0}))
    leanmoe.moe_experts(*p.args(), **p.kwargs())
    assert fake.timed == ["slow_first", "fast_second"] and fake.calls[-1] == "fast_second"


def test_cpu_and_empty_calls_keep_the_priority_order(fake, monkeypatch):
    p = _problem(0, requires_grad=False)
    assert autoselect.choose(_call(p)) is None  # T=0: nothing to time
    monkeypatch.setattr(autoselect, "can_measure", lambda device: device.type == "cuda")
    assert autoselect.choose(_call(_problem(requires_grad=False))) is None
    assert fake.timed == []


def test_real_registry_on_cpu_is_unchanged():
    # Without fakes: CPU calls never measure; auto is the priority order.
    autoselect.clear_memory()
    p = _problem(requires_grad=False)
    assert autoselect.choose(_call(p)) is None
    assert "highest-priority" in explain_backend(_call(p))


def test_lora_on_frozen_weights_is_timed_with_backward(monkeypatch, tmp_path):
    # Only the adapter requires grad (frozen experts and an x without grad, as in the first MoE layer of a LoRA
    # model): the timed runs differentiate the adapter's parameters, still without touching their .grad.
    from leanmoe.experts.grouped_mm import GroupedMMBackend

    calls: list[str] = []

    class Named(GroupedMMBackend):
        def __init__(self, name: str, priority: int):
            self.name, self.priority = name, priority

        def __call__(self, *args, **kwargs):
            calls.append(self.name)
            return super().__call__(*args, **kwargs)

    timer = measuring(monkeypatch, tmp_path, {"a": Named("a", 100), "b": Named("b", 99)}, calls,
                      {"a": 2.0, "b": 1.0})
    try:
        p = _problem(requires_grad=False)
        lora = leanmoe.ExpertLoRA(num_experts=4, dim=16, hidden_dim=8, rank=4)
        y = leanmoe.moe_experts(*p.args(), **p.kwargs(), lora=lora)
        assert timer.timed == ["a", "b"] and calls[-1] == "b"
        assert all(q.grad is None for q in lora.parameters())
        y.sum().backward()
        assert all(q.grad is not None for q in lora.parameters())
    finally:
        autoselect.clear_memory()
