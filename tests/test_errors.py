"""Bad input gives a ValueError/TypeError naming the bad and the expected value, never a crash inside a kernel."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import make_problem


@pytest.fixture
def p():
    return make_problem(6, 8, 4, 5, 2, bias=True, requires_grad=False)


def call(p, **overrides):
    args = dict(x_TD=p.x_TD, topk_ids_TK=p.topk_ids_TK, topk_weights_TK=p.topk_weights_TK,
                gate_up_proj=p.gate_up_proj, down_proj=p.down_proj, gate_up_bias=p.gate_up_bias,
                down_bias=p.down_bias)
    kwargs = {"activation": "swiglu", "gate_up_layout": "concatenated", "backend": "auto", "save_percent": 0}
    for k, v in overrides.items():
        (kwargs if k in kwargs or k == "check_ids" else args)[k] = v
    return leanmoe.moe_experts(*args.values(), **kwargs)


@pytest.mark.parametrize(
    "override,error,match",
    [
        ({"x_TD": torch.randn(2, 3, 8)}, ValueError, r"x must be \[T, D\], got shape \[2, 3, 8\]"),
        ({"x_TD": torch.ones(6, 8, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor"),
        ({"x_TD": torch.randn(6, 9)}, ValueError, r"expects D=8, but x is \[6, 9\]"),
        ({"x_TD": "x"}, TypeError, "x must be a torch.Tensor, got str"),
        ({"topk_ids_TK": torch.zeros(6, 2)}, TypeError, "topk_ids must be int32 or int64, got dtype torch.float32"),
        ({"topk_ids_TK": torch.zeros(5, 2, dtype=torch.long)}, ValueError, r"topk_ids must be \[T, K\] with T=6"),
        ({"topk_weights_TK": torch.rand(6, 3)}, ValueError, r"topk_weights must have the shape of topk_ids \[6, 2\]"),
        ({"topk_weights_TK": torch.ones(6, 2, dtype=torch.long)}, TypeError, "topk_weights must be a floating"),
        ({"topk_ids_TK": torch.zeros(6, 6, dtype=torch.long), "topk_weights_TK": torch.rand(6, 6)}, ValueError,
         r"top-k must be in \[1, E=5\], got K=6"),
        ({"topk_ids_TK": torch.zeros(6, 0, dtype=torch.long), "topk_weights_TK": torch.rand(6, 0)}, ValueError,
         r"top-k must be in \[1, E=5\], got K=0"),
        ({"topk_ids_TK": torch.full((6, 2), 5)}, ValueError, r"topk_ids must lie in \[0, 5\), got values in \[5, 5\]"),
        ({"topk_ids_TK": torch.full((6, 2), -1)}, ValueError, r"topk_ids must lie in \[0, 5\)"),
        ({"gate_up_proj": torch.randn(5, 8)}, ValueError, r"gate_up_proj must be \[E, 2I, D\]"),
        ({"gate_up_proj": torch.randn(5, 7, 8)}, ValueError, r"expected gate_up_proj \[E, 2I, D\] = \[5, 8, 8\]"),
        ({"down_proj": torch.randn(4, 8, 4)}, ValueError, r"down_proj \[E, D, I\] = \[5, 8, 4\]"),
        ({"down_proj": torch.randn(5, 8)}, ValueError, r"down_proj must be \[E, D, I\], got shape \[5, 8\]"),
        ({"gate_up_bias": torch.randn(5, 4)}, ValueError, r"gate_up_bias must be \[5, 8\], got \[5, 4\]"),
        ({"down_bias": torch.randn(8)}, ValueError, r"down_bias must be \[5, 8\], got \[8\]"),
        ({"gate_up_proj": torch.randn(5, 8, 8, dtype=torch.float64)}, TypeError,
         "gate_up_proj dtype torch.float64 does not match down_proj dtype torch.float32"),
        ({"down_bias": torch.randn(5, 8, dtype=torch.float16)}, TypeError, "down_bias dtype torch.float16"),
        ({"activation": "swish"}, ValueError, "unknown activation 'swish'; expected one of"),
        ({"activation": 3}, TypeError, "activation must be a str or leanmoe.Activation, got int"),
        ({"gate_up_layout": "split"}, ValueError, "unknown gate_up_layout 'split'"),
        ({"backend": "cutlass"}, ValueError, "unknown backend 'cutlass'; expected 'auto' or one of"),
        ({"save_percent": 101}, ValueError, r"save_percent must be in \[0, 100\], got 101"),
        ({"save_percent": -1}, ValueError, r"save_percent must be in \[0, 100\], got -1"),
        ({"save_percent": "all"}, TypeError, "save_percent must be a number"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_inputs(p, override, error, match):
    with pytest.raises(error, match=match):
        call(p, **override)


def test_non_gated_activation_wants_single_width_gate_up(p):
    with pytest.raises(ValueError, match=r"for activation 'relu2' expected gate_up_proj \[E, I, D\] = \[5, 4, 8\]"):
        call(p, activation="relu2")


def test_device_mismatch_is_reported():
    p = make_problem(4, 8, 4, 3, 2, requires_grad=False)
    meta_ids = torch.empty(4, 2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="topk_ids is on meta but x is on cpu"):
        leanmoe.moe_experts(p.x_TD, meta_ids, p.topk_weights_TK, p.gate_up_proj, p.down_proj)


def test_check_ids_false_skips_the_range_check(p, monkeypatch):
    # The caller vouches for the ids (a router's output); the check, a host sync on GPUs, is skipped. On the CPU
    # the default (None) checks, and so does True.
    from leanmoe.experts import functional

    checked = []
    real = functional.check_expert_ids
    monkeypatch.setattr(functional, "check_expert_ids", lambda ids, E: checked.append(E) or real(ids, E))
    ref = call(p, backend="reference")
    assert checked == [5]
    out = call(p, backend="reference", check_ids=False)
    assert checked == [5] and torch.equal(out, ref)
    call(p, backend="reference", check_ids=True)
    assert checked == [5, 5]
    bad_ids = p.topk_ids_TK.clone()
    bad_ids[0, 0] = 5
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 5\), got values in \[\d+, 5\]"):
        call(p, topk_ids_TK=bad_ids)


def test_named_backend_that_cannot_run_says_why(p):
    from leanmoe.experts.registry import _BACKENDS, ExpertsBackend, register_backend

    class Never(ExpertsBackend):
        name = "test-never"

        def unsupported_reason(self, call):
            return "it never runs"

        def __call__(self, *a, **k):
            raise AssertionError("must not be called")

    register_backend(Never())
    try:
        with pytest.raises(ValueError, match="backend 'test-never' cannot run this call: it never runs"):
            call(p, backend="test-never")
        with pytest.raises(ValueError, match="already registered"):
            register_backend(Never())
    finally:
        del _BACKENDS["test-never"]


def test_missing_optional_package_names_the_extra(p):
    from leanmoe.experts.registry import _BACKENDS, ExpertsBackend, register_backend

    class NeedsPkg(ExpertsBackend):
        name = "test-needs-pkg"
        requires = ("leanmoe_no_such_package",)
        extra = "nothing"

        def __call__(self, *a, **k):
            raise AssertionError("must not be called")

    register_backend(NeedsPkg())
    try:
        with pytest.raises(ValueError, match=r"needs leanmoe_no_such_package \(pip install 'leanmoe\[nothing\]'\)"):
            call(p, backend="test-needs-pkg")
    finally:
        del _BACKENDS["test-needs-pkg"]


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"top_k": 9}, ValueError, "top_k must be <= num_experts, got top_k=9, num_experts=8"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
        ({"top_k": 2.0}, TypeError, r"top_k must be an int, got float \(2.0\)"),
        ({"num_experts": 0}, ValueError, "num_experts must be >= 1, got 0"),
        ({"score_func": "tanh"}, ValueError, "unknown score_func 'tanh'"),
        ({"activation": "swish"}, ValueError, "unknown activation 'swish'"),
        ({"gate_up_layout": "split"}, ValueError, "unknown gate_up_layout 'split'"),
        ({"n_group": 3}, ValueError, "num_experts must be divisible by n_group, got num_experts=8, n_group=3"),
        ({"n_group": 2, "topk_group": 3}, ValueError, "topk_group must be <= n_group, got topk_group=3, n_group=2"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, ValueError, "top_k=3 exceeds the 2 experts left"),
        ({"save_percent": 200}, ValueError, r"save_percent must be in \[0, 100\], got 200"),
        ({"aux_loss_coef": -1.0}, ValueError, "aux_loss_coef must be >= 0, got -1.0"),
        ({"num_shared_experts": -1}, ValueError, "num_shared_experts must be >= 0, got -1"),
    ],
)
def test_bad_config(kw, error, match):
    base = {"dim": 16, "hidden_dim": 8, "num_experts": 8, "top_k": 2}
    base.update(kw)
    with pytest.raises(error, match=match):
        leanmoe.MoEConfig(**base)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        leanmoe.MoEConfig(16, 8, 8, 2)


def test_layer_bad_inputs():
    layer = leanmoe.MoE(leanmoe.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"x must be \[..., 16\], got shape \[3, 15\]"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(TypeError, match=r"token_mask must be a bool tensor \(True = keep\), got dtype torch.float32"):
        layer(torch.randn(3, 16), token_mask=torch.ones(3))
    with pytest.raises(TypeError, match="config must be a leanmoe.MoEConfig, got dict"):
        leanmoe.MoE({"dim": 16})


def test_auto_passes_over_grouped_mm_for_unaligned_rows_and_says_why():
    # bf16 rows of D=12 are 24 bytes: torch._grouped_mm needs 16-byte multiples.
    p = make_problem(5, 12, 8, 4, 2, dtype=torch.bfloat16, requires_grad=False)
    why = leanmoe.explain_backend(leanmoe.describe_call(*p.args(), **p.kwargs()))
    assert "auto picked 'reference'" in why and "D and I multiples of 8 for torch.bfloat16, got D=12, I=8" in why
    with pytest.raises(ValueError, match="backend 'grouped_mm' cannot run this call: torch._grouped_mm needs 16-byte"):
        leanmoe.moe_experts(*p.args(), backend="grouped_mm", **p.kwargs())


# --- every field of the public constructors is checked where it is given ------------------------------------------


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"dim": True}, TypeError, r"dim must be an int, got bool \(True\)"),  # a bool is not a size
        ({"hidden_dim": 8.0}, TypeError, r"hidden_dim must be an int, got float \(8.0\)"),
        ({"num_experts": "8"}, TypeError, r"num_experts must be an int, got str \('8'\)"),
        ({"dim": 0}, ValueError, "dim must be >= 1, got 0"),
        ({"hidden_dim": -4}, ValueError, "hidden_dim must be >= 1, got -4"),
        ({"n_group": 0}, ValueError, "n_group must be >= 1, got 0"),
        ({"shared_hidden_dim": 0}, ValueError, "shared_hidden_dim must be >= 1, got 0"),
        ({"num_shared_experts": 1.5}, TypeError, r"num_shared_experts must be an int, got float \(1.5\)"),
        ({"route_scale": float("nan")}, ValueError, "route_scale must be a finite number, got nan"),
        ({"route_scale": float("inf")}, ValueError, "route_scale must be a finite number, got inf"),
        ({"route_scale": 0.0}, ValueError, r"route_scale must be > 0, got 0.0"),
        ({"route_scale": "2.5"}, TypeError, r"route_scale must be a finite number, got str \('2.5'\)"),
        ({"aux_loss_coef": float("nan")}, ValueError, "aux_loss_coef must be a finite number, got nan"),
        ({"z_loss_coef": float("-inf")}, ValueError, "z_loss_coef must be a finite number, got -inf"),
        ({"balance_bias_rate": -0.1}, ValueError, "balance_bias_rate must be >= 0, got -0.1"),
        ({"z_loss_coef": True}, TypeError, r"z_loss_coef must be a finite number, got bool \(True\)"),
        ({"bias": "yes"}, TypeError, r"bias must be a bool, got str \('yes'\)"),
        ({"norm_topk_prob": 1}, TypeError, r"norm_topk_prob must be a bool, got int \(1\)"),
        ({"balance_bias": None}, TypeError, r"balance_bias must be a bool, got NoneType \(None\)"),
        ({"score_func": 1}, TypeError, "score_func must be a str, one of"),
        ({"backend": "cutlass"}, ValueError, "unknown backend 'cutlass'; expected 'auto' or one of"),
        ({"backend": None}, TypeError, "backend must be a str"),
        ({"save_percent": float("nan")}, ValueError, r"save_percent must be in \[0, 100\], got nan"),
        ({"save_percent": True}, TypeError, "save_percent must be a number"),
    ],
)
def test_bad_config_fields(kw, error, match):
    base = {"dim": 16, "hidden_dim": 8, "num_experts": 8, "top_k": 2}
    base.update(kw)
    with pytest.raises(error, match=match):
        leanmoe.MoEConfig(**base)


def test_config_accepts_numpy_and_tensor_integers_as_ints():
    np = pytest.importorskip("numpy")
    cfg = leanmoe.MoEConfig(dim=np.int64(16), hidden_dim=torch.tensor(8), num_experts=8, top_k=np.int32(2),
                            route_scale=np.float32(2.0))
    assert (type(cfg.dim), type(cfg.hidden_dim), type(cfg.top_k), type(cfg.route_scale)) == (int, int, int, float)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"num_experts": 0}, ValueError, "num_experts must be >= 1, got 0"),
        ({"dim": 2.5}, TypeError, r"dim must be an int, got float \(2.5\)"),
        ({"hidden_dim": "4"}, TypeError, r"hidden_dim must be an int, got str \('4'\)"),
        ({"bias": 1}, TypeError, r"bias must be a bool, got int \(1\)"),
        ({"backend": "nope"}, ValueError, "unknown backend 'nope'"),
        ({"save_percent": -1}, ValueError, r"save_percent must be in \[0, 100\], got -1"),
        ({"dtype": torch.long}, TypeError, "dtype must be a floating-point dtype, got torch.int64"),
        ({"dtype": "float32"}, TypeError, r"dtype must be a torch.dtype or None, got str \('float32'\)"),
        ({"activation": "swish"}, ValueError, "unknown activation 'swish'"),
        ({"gate_up_layout": "split"}, ValueError, "unknown gate_up_layout 'split'"),
    ],
)
def test_bad_grouped_experts_arguments(kw, error, match):
    base = {"num_experts": 4, "dim": 8, "hidden_dim": 4}
    base.update(kw)
    with pytest.raises(error, match=match):
        leanmoe.GroupedExperts(**base)


def test_bad_router_and_shared_experts_arguments():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    with pytest.raises(TypeError, match=r"config must be a leanmoe.RouterConfig \(with dim=\) or a leanmoe.MoEConfig, "
                                        r"got dict"):
        leanmoe.TopKRouter({"dim": 8})
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got torch.int32"):
        leanmoe.TopKRouter(cfg, dtype=torch.int32)
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        leanmoe.SharedExperts(dim=0, hidden_dim=4)
    with pytest.raises(TypeError, match=r"gated_output must be a bool, got str \('no'\)"):
        leanmoe.SharedExperts(dim=8, hidden_dim=4, gated_output="no")


def test_router_input_shape_is_checked():
    router = leanmoe.TopKRouter(leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"x must be \[T, 8\] \(the router's dim\), got shape \[3, 4, 8\]"):
        router(torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match=r"x must be \[T, 8\] \(the router's dim\), got shape \[3, 7\]"):
        router(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        router(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        router([[0.0] * 8])


def test_cuda_only_backend_on_a_cpu_module_is_refused_at_construction(monkeypatch):
    # Triton runs CPU tensors only in its interpreter: without it, a CPU module naming triton can never run.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on this module's device \(cpu\): on CPU "
                                         r"tensors it runs only in the Triton interpreter"):
        leanmoe.GroupedExperts(num_experts=4, dim=16, hidden_dim=8, backend="triton")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on this module's device \(cpu\)"):
        leanmoe.MoE(leanmoe.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, backend="triton"))
    # On meta the device is not decided yet (to_empty decides it): nothing to refuse.
    leanmoe.MoE(leanmoe.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, backend="triton"), device="meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    leanmoe.GroupedExperts(num_experts=4, dim=16, hidden_dim=8, backend="triton")


def test_backend_that_fits_no_dtype_is_refused_at_construction_one_dtype_is_left_to_the_forward():
    # D=3: 12-byte fp32 rows, 6-byte bf16/fp16 rows: torch._grouped_mm can run this module in no dtype.
    with pytest.raises(ValueError, match=r"backend 'grouped_mm' cannot run on this module's device \(cpu\): "
                                         r"torch._grouped_mm needs 16-byte rows"):
        leanmoe.GroupedExperts(num_experts=4, dim=3, hidden_dim=4, backend="grouped_mm")
    # D=12 in bf16: 24-byte rows, but fp32 rows are aligned, so a cast could make it run: refused at the forward.
    experts = leanmoe.GroupedExperts(num_experts=4, dim=12, hidden_dim=8, backend="grouped_mm", dtype=torch.bfloat16)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    ids = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="backend 'grouped_mm' cannot run this call: torch._grouped_mm needs 16-byte"):
        experts(x, ids, torch.ones(3, 1, dtype=torch.bfloat16))
    assert experts.to(torch.float32)(x.float(), ids, torch.ones(3, 1)).shape == (3, 12)
