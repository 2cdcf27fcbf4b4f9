"""Configs: the nested form and the flat one build equal configs and equal layers; every part validates alone; a
router and experts build from their own part; mixing the two forms for one setting is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import leanmoe
from leanmoe.config import FLAT_FIELDS
from tests.helpers import assert_close

# Flat configs and the nested configs they must equal, each with non-default values in the part it exercises.
PAIRS = {
    "minimal": (
        {"dim": 16, "hidden_dim": 8, "num_experts": 4, "top_k": 2},
        {"dim": 16, "router": leanmoe.RouterConfig(num_experts=4, top_k=2),
         "experts": leanmoe.ExpertsConfig(num_experts=4, hidden_dim=8)},
    ),
    "every-router-field": (
        {"dim": 16, "hidden_dim": 8, "num_experts": 8, "top_k": 3, "score_func": "sigmoid", "norm_topk_prob": False,
         "route_scale": 2.5, "router_bias": True, "n_group": 4, "topk_group": 2, "balance_bias": True,
         "balance_bias_rate": 0.01, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
        {"dim": 16,
         "router": leanmoe.RouterConfig(num_experts=8, top_k=3, score_func="sigmoid", norm_topk_prob=False,
                                        route_scale=2.5, bias=True, n_group=4, topk_group=2, balance_bias=True,
                                        balance_bias_rate=0.01, aux_loss_coef=0.01, z_loss_coef=0.001),
         "experts": leanmoe.ExpertsConfig(num_experts=8, hidden_dim=8)},
    ),
    "every-experts-field": (
        {"dim": 16, "hidden_dim": 8, "num_experts": 5, "top_k": 5,  # K = E, prime E
         "activation": leanmoe.Activation(name="clamped_swiglu", limit=5.0), "gate_up_layout": "interleaved",
         "bias": True, "backend": "reference", "save_percent": 50},
        {"dim": 16, "router": leanmoe.RouterConfig(num_experts=5, top_k=5),
         "experts": leanmoe.ExpertsConfig(num_experts=5, hidden_dim=8,
                                          activation=leanmoe.Activation(name="clamped_swiglu", limit=5.0),
                                          gate_up_layout="interleaved", bias=True, backend="reference",
                                          save_percent=50)},
    ),
    "shared-experts": (
        {"dim": 16, "hidden_dim": 8, "num_experts": 4, "top_k": 1, "activation": "relu2", "num_shared_experts": 2,
         "shared_hidden_dim": 12, "shared_expert_gate": True},
        {"dim": 16, "router": leanmoe.RouterConfig(num_experts=4, top_k=1),
         "experts": leanmoe.ExpertsConfig(num_experts=4, hidden_dim=8, activation="relu2"),
         "shared_experts": leanmoe.SharedExpertsConfig(num_experts=2, hidden_dim=12, gated_output=True)},
    ),
}


@pytest.mark.parametrize("name", PAIRS)
def test_flat_and_nested_forms_build_equal_configs(name):
    flat_kw, nested_kw = PAIRS[name]
    flat, nested = leanmoe.MoEConfig(**flat_kw), leanmoe.MoEConfig(**nested_kw)
    assert flat == nested and hash(flat) == hash(nested) and repr(flat) == repr(nested)
    assert flat != dataclasses.replace(nested, dim=32)
    # The repr is the nested form, and it builds the config back.
    assert repr(flat).startswith("MoEConfig(dim=16, router=RouterConfig(num_experts=")
    assert eval(repr(flat), vars(leanmoe)) == flat  # noqa: S307 (our own repr)


@pytest.mark.parametrize("name", PAIRS)
def test_flat_names_read_the_nested_fields(name):
    flat_kw, _ = PAIRS[name]
    cfg = leanmoe.MoEConfig(**flat_kw)
    for field, value in flat_kw.items():
        expected = leanmoe.Activation(name=value) if field == "activation" and isinstance(value, str) else value
        assert getattr(cfg, field) == expected, field
        for path in FLAT_FIELDS.get(field, ()):
            part, nested_field = path.split(".")
            assert getattr(getattr(cfg, part), nested_field) == expected, path
    assert cfg.gate_up_rows == (2 * cfg.hidden_dim if cfg.activation.gated else cfg.hidden_dim)


def test_flat_defaults_and_no_shared_experts():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    assert cfg.shared_experts is None
    assert (cfg.num_shared_experts, cfg.shared_hidden_dim, cfg.shared_expert_gate) == (0, None, False)
    assert (cfg.backend, cfg.save_percent, cfg.router_bias, cfg.score_func) == ("auto", 0, False, "softmax")
    # num_shared_experts=0 is the flat form's "none".
    assert leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, num_shared_experts=0) == cfg


def test_configs_are_frozen():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.router.top_k = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 16
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # a read-only view of router.top_k
    assert cfg.top_k == 2


def test_replace_a_part_is_validated():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    wider = dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, top_k=4))
    assert wider.top_k == 4 and cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k must be <= num_experts, got top_k=5, num_experts=4"):
        dataclasses.replace(cfg.router, top_k=5)
    with pytest.raises(ValueError, match=r"router.num_experts and experts.num_experts must be equal .*got "
                                         r"router.num_experts=6, experts.num_experts=4"):
        dataclasses.replace(cfg, router=leanmoe.RouterConfig(num_experts=6, top_k=2))
    # A flat name in replace() sets a field the nested router already sets: refused, with the way to do it.
    with pytest.raises(ValueError, match=r"top_k=3 and router= \(with router.top_k=2\) both set router.top_k.*"
                                         r"dataclasses.replace\(config, router=dataclasses.replace\(config.router"):
        dataclasses.replace(cfg, top_k=3)


@pytest.mark.parametrize(
    "flat,part",
    [
        ({"top_k": 2}, "router"),
        ({"router_bias": True}, "router"),
        ({"num_experts": 4}, "router"),  # num_experts sets both parts
        ({"num_experts": 4}, "experts"),
        ({"hidden_dim": 4}, "experts"),
        ({"backend": "reference"}, "experts"),
        ({"num_shared_experts": 1}, "shared_experts"),
        ({"shared_expert_gate": True}, "shared_experts"),
    ],
)
def test_mixing_forms_for_one_setting_is_refused(flat, part):
    nested = {"router": leanmoe.RouterConfig(num_experts=4, top_k=2),
              "experts": leanmoe.ExpertsConfig(num_experts=4, hidden_dim=4),
              "shared_experts": leanmoe.SharedExpertsConfig()}
    kw = {"dim": 8, **{k: v for k, v in nested.items() if k == part}, **flat}
    (name, value), = flat.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r} and {part}= \(with {part}\.\w+=.*\) both set "
                                         rf"{part}\.\w+: give it once"):
        leanmoe.MoEConfig(**kw)


def test_flat_shared_experts_beside_nested_router_and_experts():
    # The shared experts have their own flat names, so they can be given flat beside the nested parts.
    cfg = leanmoe.MoEConfig(dim=8, router=leanmoe.RouterConfig(num_experts=4, top_k=2),
                            experts=leanmoe.ExpertsConfig(num_experts=4, hidden_dim=4), num_shared_experts=2)
    assert cfg.shared_experts == leanmoe.SharedExpertsConfig(num_experts=2)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        ({"dim": 8}, TypeError, r"MoEConfig needs router=RouterConfig\(...\) or the flat num_experts= and top_k=, "
                                r"got neither"),
        ({"dim": 8, "num_experts": 4, "top_k": 2}, TypeError,
         r"MoEConfig needs experts=ExpertsConfig\(...\) or the flat hidden_dim=, got neither"),
        ({"dim": 8, "hidden_dim": 4, "num_experts": 4, "top_k": 2, "topk": 2}, TypeError,
         "MoEConfig got an unexpected keyword argument 'topk'; expected dim, router, experts, shared_experts or a "
         "flat field"),
        ({"dim": 8, "router": {"num_experts": 4, "top_k": 2}, "experts": leanmoe.ExpertsConfig(num_experts=4,
                                                                                                hidden_dim=4)},
         TypeError, "router must be a leanmoe.RouterConfig, got dict"),
        ({"dim": 8, "router": leanmoe.RouterConfig(num_experts=4, top_k=2),
          "experts": leanmoe.RouterConfig(num_experts=4, top_k=2)},
         TypeError, "experts must be a leanmoe.ExpertsConfig, got RouterConfig"),
        ({"dim": 8, "hidden_dim": 4, "num_experts": 4, "top_k": 2, "shared_experts": 2}, TypeError,
         "shared_experts must be a leanmoe.SharedExpertsConfig or None, got int"),
        ({"dim": 0, "router": leanmoe.RouterConfig(num_experts=4, top_k=2),
          "experts": leanmoe.ExpertsConfig(num_experts=4, hidden_dim=4)}, ValueError, "dim must be >= 1, got 0"),
        # The flat names the nested configs spell differently are named as given.
        ({"dim": 8, "hidden_dim": 4, "num_experts": 4, "top_k": 2, "router_bias": "yes"}, TypeError,
         r"router_bias must be a bool, got str \('yes'\)"),
        ({"dim": 8, "hidden_dim": 4, "num_experts": 4, "top_k": 2, "shared_expert_gate": 1}, TypeError,
         r"shared_expert_gate must be a bool, got int \(1\)"),
        ({"dim": 8, "hidden_dim": 4, "num_experts": 4, "top_k": 2, "num_shared_experts": -1}, ValueError,
         "num_shared_experts must be >= 0, got -1"),
    ],
)
def test_bad_moe_config(kw, error, match):
    with pytest.raises(error, match=match):
        leanmoe.MoEConfig(**kw)


@pytest.mark.parametrize(
    "cls,kw,error,match",
    [
        (leanmoe.RouterConfig, {"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
        (leanmoe.RouterConfig, {"top_k": 5}, ValueError, "top_k must be <= num_experts, got top_k=5, num_experts=4"),
        (leanmoe.RouterConfig, {"num_experts": 4.0}, TypeError, r"num_experts must be an int, got float \(4.0\)"),
        (leanmoe.RouterConfig, {"score_func": "tanh"}, ValueError, "unknown score_func 'tanh'; expected one of"),
        (leanmoe.RouterConfig, {"bias": 1}, TypeError, r"bias must be a bool, got int \(1\)"),
        (leanmoe.RouterConfig, {"n_group": 3}, ValueError,
         "num_experts must be divisible by n_group, got num_experts=4, n_group=3"),
        (leanmoe.RouterConfig, {"n_group": 2, "topk_group": 3}, ValueError,
         "topk_group must be <= n_group, got topk_group=3, n_group=2"),
        (leanmoe.RouterConfig, {"n_group": 4, "topk_group": 1}, ValueError,
         "top_k=2 exceeds the 1 experts left by topk_group=1 groups of 1"),
        (leanmoe.RouterConfig, {"route_scale": -1}, ValueError, "route_scale must be > 0, got -1.0"),
        (leanmoe.RouterConfig, {"z_loss_coef": float("nan")}, ValueError, "z_loss_coef must be a finite number"),
        (leanmoe.ExpertsConfig, {"hidden_dim": 0}, ValueError, "hidden_dim must be >= 1, got 0"),
        (leanmoe.ExpertsConfig, {"activation": "swish"}, ValueError, "unknown activation 'swish'"),
        (leanmoe.ExpertsConfig, {"gate_up_layout": "split"}, ValueError, "unknown gate_up_layout 'split'"),
        (leanmoe.ExpertsConfig, {"bias": "no"}, TypeError, r"bias must be a bool, got str \('no'\)"),
        (leanmoe.ExpertsConfig, {"backend": "cutlass"}, ValueError, "unknown backend 'cutlass'"),
        (leanmoe.ExpertsConfig, {"save_percent": 101}, ValueError, r"save_percent must be in \[0, 100\], got 101"),
        (leanmoe.SharedExpertsConfig, {"num_experts": 0}, ValueError, "num_experts must be >= 1, got 0"),
        (leanmoe.SharedExpertsConfig, {"hidden_dim": True}, TypeError, r"hidden_dim must be an int, got bool"),
        (leanmoe.SharedExpertsConfig, {"gated_output": None}, TypeError, "gated_output must be a bool, got NoneType"),
    ],
)
def test_bad_nested_config_fields(cls, kw, error, match):
    base = {leanmoe.RouterConfig: {"num_experts": 4, "top_k": 2},
            leanmoe.ExpertsConfig: {"num_experts": 4, "hidden_dim": 4},
            leanmoe.SharedExpertsConfig: {}}[cls]
    with pytest.raises(error, match=match):
        cls(**{**base, **kw})


def test_nested_configs_are_keyword_only_and_normalise_their_values():
    with pytest.raises(TypeError):
        leanmoe.RouterConfig(4, 2)
    with pytest.raises(TypeError):
        leanmoe.MoEConfig(8, leanmoe.RouterConfig(num_experts=4, top_k=2))
    np = pytest.importorskip("numpy")
    router = leanmoe.RouterConfig(num_experts=np.int64(4), top_k=torch.tensor(2), route_scale=np.float32(2.0))
    assert (type(router.num_experts), type(router.top_k), type(router.route_scale)) == (int, int, float)
    assert leanmoe.ExpertsConfig(num_experts=4, hidden_dim=4, activation="geglu").activation == \
        leanmoe.Activation(name="geglu")


def test_router_builds_without_expert_sizes():
    router_cfg = leanmoe.RouterConfig(num_experts=7, top_k=3, bias=True, balance_bias=True)
    torch.manual_seed(0)
    router = leanmoe.TopKRouter(router_cfg, dim=12)
    assert router.config is router_cfg and router.dim == 12
    assert router.weight.shape == (7, 12) and router.bias.shape == (7,) and router.expert_bias.shape == (7,)
    out = router(torch.randn(5, 12))
    assert out.topk_ids_TK.shape == (5, 3) and int(out.tokens_per_expert_E.sum()) == 15
    # The same router, from a MoEConfig holding it: same parameters from the same seed.
    moe_cfg = leanmoe.MoEConfig(dim=12, router=router_cfg, experts=leanmoe.ExpertsConfig(num_experts=7, hidden_dim=4))
    torch.manual_seed(0)
    from_moe = leanmoe.TopKRouter(moe_cfg)
    assert from_moe.config == router_cfg and from_moe.dim == 12
    assert torch.equal(from_moe.weight, router.weight)


def test_experts_build_from_their_part():
    experts_cfg = leanmoe.ExpertsConfig(num_experts=3, hidden_dim=4, activation="relu2", bias=True)
    experts = leanmoe.GroupedExperts.from_config(experts_cfg, dim=8)
    assert experts.gate_up_proj.shape == (3, 4, 8) and experts.down_proj.shape == (3, 8, 4)
    assert experts.gate_up_bias.shape == (3, 4) and experts.activation.name == "relu2"


@pytest.mark.parametrize("build", [
    lambda cfg: leanmoe.TopKRouter(cfg.router),
    lambda cfg: leanmoe.GroupedExperts.from_config(cfg.experts),
], ids=["router", "experts"])
def test_a_part_needs_the_model_dim(build):
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    with pytest.raises(TypeError, match=r"dim is required with a (Router|Experts)Config: the model dim D is not part"):
        build(cfg)


def test_a_part_refuses_a_second_dim_or_a_wrong_config():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"dim=8 and a MoEConfig \(dim=8\) both give the model dim: pass dim= only "
                                         r"with a RouterConfig"):
        leanmoe.TopKRouter(cfg, dim=8)
    with pytest.raises(TypeError, match=r"config must be a leanmoe.ExpertsConfig \(with dim=\) or a "
                                        r"leanmoe.MoEConfig, got RouterConfig"):
        leanmoe.GroupedExperts.from_config(cfg.router, dim=8)
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        leanmoe.TopKRouter(cfg.router, dim=0)


@pytest.mark.parametrize("name", PAIRS)
def test_moe_from_nested_equals_moe_from_flat(name):
    flat_kw, nested_kw = PAIRS[name]
    torch.manual_seed(0)
    ref_layer = leanmoe.MoE(leanmoe.MoEConfig(**flat_kw))
    torch.manual_seed(0)
    layer = leanmoe.MoE(leanmoe.MoEConfig(**nested_kw))
    ref_state, state = ref_layer.state_dict(), layer.state_dict()
    assert ref_state.keys() == state.keys()
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    x = torch.randn(3, 5, flat_kw["dim"])
    ref_x, out_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref_y, out_y = ref_layer(ref_x), layer(out_x)
    assert torch.equal(out_y, ref_y)
    (ref_y.square().sum() + ref_layer.aux_loss).backward()
    (out_y.square().sum() + layer.aux_loss).backward()
    assert torch.equal(out_x.grad, ref_x.grad)
    for (key, p), ref_p in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        assert torch.equal(p.grad, ref_p.grad), key


def test_moe_is_its_parts_built_in_order():
    # The layer builds router, experts, then shared experts from its config's parts: a seed gives the same
    # parameters as the parts built by hand in that order, and the same output as running them by hand.
    cfg = leanmoe.MoEConfig(dim=16, router=leanmoe.RouterConfig(num_experts=6, top_k=2, bias=True),
                            experts=leanmoe.ExpertsConfig(num_experts=6, hidden_dim=8, bias=True),
                            shared_experts=leanmoe.SharedExpertsConfig(num_experts=2, gated_output=True))
    torch.manual_seed(1)
    layer = leanmoe.MoE(cfg)
    torch.manual_seed(1)
    router = leanmoe.TopKRouter(cfg.router, dim=16)
    experts = leanmoe.GroupedExperts.from_config(cfg.experts, dim=16)
    shared = leanmoe.SharedExperts(dim=16, hidden_dim=2 * 8, gated_output=True)  # default: num_experts * I
    parts = {**{f"router.{k}": v for k, v in router.state_dict().items()},
             **{f"experts.{k}": v for k, v in experts.state_dict().items()},
             **{f"shared_experts.{k}": v for k, v in shared.state_dict().items()}}
    state = layer.state_dict()
    assert state.keys() == parts.keys()
    for key in state:
        assert torch.equal(state[key], parts[key]), key
    x_TD = torch.randn(9, 16)
    r = router(x_TD)
    ref_y = experts(x_TD, r.topk_ids_TK, r.topk_weights_TK) + shared(x_TD)
    assert_close(layer(x_TD), ref_y, tol=1e-6, name="layer vs parts")
