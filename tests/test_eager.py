"""Forward-only eager calls run the ops' bodies directly (:mod:`leanmoe.experts.eager`): the same result as the op,
the op itself wherever something traces (fake tensors, dispatch modes, meta tensors, torch.compile).

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leanmoe
from leanmoe.experts import eager
from tests.helpers import make_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def _backends() -> list[tuple[str, str, str, str]]:
    """(backend, module, op attribute, body attribute) of every forward op that a no-grad call may bypass."""
    rows = [("grouped_mm", "leanmoe.experts.grouped_mm", "grouped_mm_experts_fwd", "_grouped_mm_experts_fwd")]
    try:
        import triton  # noqa: F401
    except ImportError:
        return rows
    return rows + [("triton", "leanmoe.experts.triton", "triton_experts_fwd", "_triton_experts_fwd"),
                   ("triton_decode", "leanmoe.experts.decode", "triton_decode_fwd", "_triton_decode_fwd")]


BACKENDS = _backends()


def _count_calls(monkeypatch, module: str, name: str) -> list[int]:
    import importlib

    mod = importlib.import_module(module)
    calls: list[int] = []
    fn = getattr(mod, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls


def test_runs_directly_rules():
    x = torch.randn(3, 4)
    assert eager.runs_directly(x, None, torch.nn.Parameter(torch.randn(2)))
    assert not eager.runs_directly(x, torch.empty(2, device="meta"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert not eager.runs_directly(x)

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Recording():
        assert not eager.runs_directly(x)
    assert eager.op_or_body("op", "body", x) == "body"
    assert eager.op_or_body("op", "body", torch.empty(1, device="meta")) == "op"

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        return t + 1 if eager.runs_directly(t) else t - 1

    assert torch.equal(traced(x), x - 1)  # torch.compile tracing takes the op


@pytest.mark.parametrize("backend, module, op, body", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_no_grad_call_bypasses_the_op_with_the_same_result(monkeypatch, backend, module, op, body):
    p = make_problem(9, 32, 24, 5, 2, bias=True, requires_grad=False, seed=3)
    mask = torch.rand(9, generator=torch.Generator().manual_seed(4)) > 0.3
    op_calls = _count_calls(monkeypatch, module, op)
    body_calls = _count_calls(monkeypatch, module, body)
    with torch.no_grad():
        direct = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, token_mask=mask)
    assert (len(op_calls), len(body_calls)) == (0, 1)

    # Under a dispatch mode the same call goes through the op (which runs the same body): the same bits.
    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), PassThrough():
        through_op = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, token_mask=mask)
    assert len(op_calls) == 1
    assert torch.equal(direct, through_op)


@pytest.mark.parametrize("backend, module, op, body", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_fake_and_meta_calls_take_the_op(monkeypatch, backend, module, op, body):
    # The op holds the original body, so the counter on the module's name sees direct calls only.
    op_calls = _count_calls(monkeypatch, module, op)
    body_calls = _count_calls(monkeypatch, module, body)
    p = make_problem(6, 32, 24, 5, 2, requires_grad=False, seed=5)
    with torch.no_grad(), torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        args = [mode.from_tensor(t) if t is not None else None for t in p.args()]
        y = leanmoe.moe_experts(*args, **p.kwargs(), backend=backend, check_ids=False)
    assert tuple(y.shape) == (6, 32) and isinstance(y, torch._subclasses.fake_tensor.FakeTensor)
    meta = [t.to("meta") if t is not None else None for t in p.args()]
    with torch.no_grad():
        y = leanmoe.moe_experts(*meta, **p.kwargs(), backend=backend)
    assert tuple(y.shape) == (6, 32) and y.is_meta
    assert (len(op_calls), len(body_calls)) == (2, 0)


@pytest.mark.parametrize("backend, module, op, body", BACKENDS[:2], ids=[b[0] for b in BACKENDS[:2]])
def test_calls_that_need_grad_keep_the_op(monkeypatch, backend, module, op, body):
    p = make_problem(7, 32, 24, 5, 2, seed=6)
    op_calls = _count_calls(monkeypatch, module, op)
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend)
    assert len(op_calls) == 1 and y.grad_fn is not None
