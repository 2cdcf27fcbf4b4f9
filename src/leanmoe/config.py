"""Keyword-only configuration for the MoE layer, its router and its experts.

``MoEConfig(dim=..., router=RouterConfig(...), experts=ExpertsConfig(...), shared_experts=SharedExpertsConfig(...))``
is the documented form: each part is a frozen, validated dataclass that builds its module alone
(``TopKRouter(router, dim=D)``, ``GroupedExperts.from_config(experts, dim=D)``). The flat form of earlier releases,
``MoEConfig(dim=..., hidden_dim=..., num_experts=..., top_k=..., ...)``, builds the same nested configs (an equal
``MoEConfig``), and every flat name stays readable as a property (``config.top_k`` is ``config.router.top_k``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Literal, TypeVar

from leanmoe.activations import Activation, GateUpLayout, check_layout, resolve_activation

ScoreFunc = Literal["softmax", "sigmoid"]
SCORE_FUNCS = ("softmax", "sigmoid")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: any integer (Python, NumPy, a 0-d integer tensor), never a bool, a float
    or a string."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: object) -> None:
    # A string such as "false" is truthy: only real bools are accepted.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_real(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``); bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return value


def check_save_percent(save_percent: object) -> None:
    if isinstance(save_percent, bool) or not isinstance(save_percent, numbers.Real):
        raise TypeError(f"save_percent must be a number in [0, 100], got {type(save_percent).__name__}")
    if not 0 <= float(save_percent) <= 100:  # NaN fails this too
        raise ValueError(f"save_percent must be in [0, 100], got {save_percent}")


def check_backend_name(backend: object) -> None:
    """``backend`` must be ``"auto"`` or a registered backend name."""
    from leanmoe.experts.registry import available_backends  # the registry imports this module's users

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or one of {available_backends()}), got "
                        f"{type(backend).__name__}")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")


def _set(config: object, name: str, value: object) -> None:
    # The configs are frozen; __post_init__ stores each field in its checked, normalised form.
    object.__setattr__(config, name, value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """The top-k router (:class:`leanmoe.TopKRouter`). It holds no expert sizes, so a router builds alone:
    ``TopKRouter(RouterConfig(num_experts=E, top_k=K), dim=D)``.

    Scoring is fp32: ``score_func`` over the logits (``x @ weight.T``, plus a learned ``bias [E]`` when ``bias``),
    top-``top_k`` of ``num_experts`` with ties toward the lower expert index, optional node-limited selection
    (``n_group`` groups of experts, the best ``topk_group`` of them kept, a group scored by the sum of its top-2
    selection scores as in DeepSeek-V3), weights renormalised when ``norm_topk_prob`` and scaled by ``route_scale``.
    ``balance_bias`` enables the aux-loss-free selection bias, updated by
    :meth:`leanmoe.TopKRouter.update_balance_bias` with ``balance_bias_rate``. ``aux_loss_coef`` (Switch
    load-balancing loss) and ``z_loss_coef`` (router z-loss) are summed into ``MoE.aux_loss``.

    Raises ``TypeError`` for a wrong type (a bool, float or string where an int is expected, a flag that is not a
    bool, a number that is a string) and ``ValueError`` for a value out of range (sizes < 1, ``top_k >
    num_experts``, groups that do not divide the experts or leave fewer than ``top_k``, ``route_scale <= 0``,
    non-finite or negative coefficients, an unknown ``score_func``), each naming the field, the value and what is
    expected.
    """

    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    balance_bias: bool = False
    balance_bias_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "n_group", "topk_group"):
            _set(self, name, check_int(name, getattr(self, name), 1))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        for name in ("norm_topk_prob", "bias", "balance_bias"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.score_func, str):
            raise TypeError(f"score_func must be a str, one of {SCORE_FUNCS}, got {type(self.score_func).__name__}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown score_func {self.score_func!r}; expected one of {SCORE_FUNCS}")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"num_experts must be divisible by n_group, got num_experts={self.num_experts}, n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group must be <= n_group, got topk_group={self.topk_group}, n_group={self.n_group}")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.topk_group * (self.num_experts // self.n_group)} experts "
                f"left by topk_group={self.topk_group} groups of {self.num_experts // self.n_group}"
            )
        _set(self, "route_scale", check_real("route_scale", self.route_scale, minimum=0.0, strict=True))
        for name in ("balance_bias_rate", "aux_loss_coef", "z_loss_coef"):
            _set(self, name, check_real(name, getattr(self, name), minimum=0.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertsConfig:
    """The routed experts (:class:`leanmoe.GroupedExperts`): ``num_experts`` experts of hidden size ``hidden_dim``.

    Gated activations keep ``gate_up_proj [E, 2I, D]`` in ``gate_up_layout``, non-gated ones ``[E, I, D]``; ``bias``
    adds ``gate_up_bias`` and ``down_bias``. ``activation`` (a name or a :class:`leanmoe.Activation`) is stored as an
    Activation. ``backend`` (``"auto"`` or a registered name) and ``save_percent`` (in ``[0, 100]``: the share of
    pre-activations kept for backward) choose how the experts are computed, never what they compute. Each field is
    checked here, a bad one raising ``TypeError``/``ValueError`` naming it, its value and what is expected.
    """

    num_experts: int
    hidden_dim: int
    activation: str | Activation = "swiglu"
    gate_up_layout: GateUpLayout = "concatenated"
    bias: bool = False
    backend: str = "auto"
    save_percent: float = 0

    def __post_init__(self) -> None:
        for name in ("num_experts", "hidden_dim"):
            _set(self, name, check_int(name, getattr(self, name), 1))
        _set(self, "activation", resolve_activation(self.activation))
        check_layout(self.gate_up_layout)
        check_bool("bias", self.bias)
        check_backend_name(self.backend)
        check_save_percent(self.save_percent)

    @property
    def gate_up_rows(self) -> int:
        """Rows of ``gate_up_proj`` per expert: 2I for gated activations, I otherwise."""
        return 2 * self.hidden_dim if self.activation.gated else self.hidden_dim  # type: ignore[union-attr]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedExpertsConfig:
    """Dense experts applied to every token (:class:`leanmoe.SharedExperts`): ``num_experts`` SwiGLU experts fused
    into one MLP of hidden size ``hidden_dim`` (None: ``num_experts`` times the routed experts' ``hidden_dim``),
    its output scaled per token by a sigmoid gate when ``gated_output`` (Qwen2-MoE's ``shared_expert_gate``)."""

    num_experts: int = 1
    hidden_dim: int | None = None
    gated_output: bool = False

    def __post_init__(self) -> None:
        _set(self, "num_experts", check_int("num_experts", self.num_experts, 1))
        if self.hidden_dim is not None:
            _set(self, "hidden_dim", check_int("hidden_dim", self.hidden_dim, 1))
        check_bool("gated_output", self.gated_output)


#: The flat form's fields, each with where it lives in the nested form (``num_experts`` sets both the router's and
#: the experts'). Every one is also a read-only property of :class:`MoEConfig`.
FLAT_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden_dim": ("experts.hidden_dim",),
    "num_experts": ("router.num_experts", "experts.num_experts"),
    "top_k": ("router.top_k",),
    "activation": ("experts.activation",),
    "gate_up_layout": ("experts.gate_up_layout",),
    "bias": ("experts.bias",),
    "score_func": ("router.score_func",),
    "norm_topk_prob": ("router.norm_topk_prob",),
    "route_scale": ("router.route_scale",),
    "router_bias": ("router.bias",),
    "n_group": ("router.n_group",),
    "topk_group": ("router.topk_group",),
    "balance_bias": ("router.balance_bias",),
    "balance_bias_rate": ("router.balance_bias_rate",),
    "aux_loss_coef": ("router.aux_loss_coef",),
    "z_loss_coef": ("router.z_loss_coef",),
    "num_shared_experts": ("shared_experts.num_experts",),
    "shared_hidden_dim": ("shared_experts.hidden_dim",),
    "shared_expert_gate": ("shared_experts.gated_output",),
    "backend": ("experts.backend",),
    "save_percent": ("experts.save_percent",),
}


def _nested_from_flat(part: str, cls: type, flat: dict[str, object]) -> object:
    """``cls(...)`` (the config of ``part``) from the flat fields that map into it."""
    kwargs = {path.split(".")[1]: flat[name] for name, paths in FLAT_FIELDS.items() if name in flat
              for path in paths if path.split(".")[0] == part}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [name for name, paths in FLAT_FIELDS.items() for path in paths
               if path.split(".")[0] == part and path.split(".")[1] in required and name not in flat]
    if missing:
        raise TypeError(f"MoEConfig needs {part}={cls.__name__}(...) or the flat "
                        f"{' and '.join(n + '=' for n in missing)}, got neither")
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class MoEConfig:
    """Everything that defines a :class:`leanmoe.MoE` layer: the model ``dim`` D and the three parts,
    ``router`` (:class:`RouterConfig`), ``experts`` (:class:`ExpertsConfig`) and ``shared_experts``
    (:class:`SharedExpertsConfig`, or None for none)::

        MoEConfig(dim=2048, router=RouterConfig(num_experts=128, top_k=8),
                  experts=ExpertsConfig(num_experts=128, hidden_dim=768))

    The flat form ``MoEConfig(dim=2048, hidden_dim=768, num_experts=128, top_k=8, ...)`` (the names of
    :data:`FLAT_FIELDS`; ``router_bias`` is ``router.bias``, ``num_shared_experts``/``shared_hidden_dim``/
    ``shared_expert_gate`` are ``shared_experts.num_experts``/``hidden_dim``/``gated_output``, and
    ``num_shared_experts=0``, the default, means no shared experts) builds the same nested configs, so both forms
    give equal configs; every flat name is also a read-only property (``config.top_k`` is ``config.router.top_k``).
    A flat field beside the nested config that holds it is a ``ValueError`` naming both.

    Frozen, compared and hashed by value; change a part with
    ``dataclasses.replace(config, router=dataclasses.replace(config.router, top_k=4))``. Every field is checked at
    construction (``TypeError``/``ValueError`` naming the field, the bad value and what is expected), and the
    router and the experts must agree on ``num_experts``.
    """

    dim: int
    router: RouterConfig
    experts: ExpertsConfig
    shared_experts: SharedExpertsConfig | None = None

    def __init__(self, *, dim: int, router: RouterConfig | None = None, experts: ExpertsConfig | None = None,
                 shared_experts: SharedExpertsConfig | None = None, **flat: object) -> None:
        unknown = [name for name in flat if name not in FLAT_FIELDS]
        if unknown:
            raise TypeError(f"MoEConfig got an unexpected keyword argument {unknown[0]!r}; expected dim, router, "
                            f"experts, shared_experts or a flat field ({', '.join(FLAT_FIELDS)})")
        nested = {"router": router, "experts": experts, "shared_experts": shared_experts}
        for name in flat:
            for path in FLAT_FIELDS[name]:
                part = path.split(".")[0]
                if nested[part] is not None:
                    value = getattr(nested[part], path.split(".")[1])
                    raise ValueError(
                        f"{name}={flat[name]!r} and {part}= (with {path}={value!r}) both set {path}: give it once, "
                        f"in {part}= or as {name}=, not both (to change one field of a config, replace the part: "
                        f"dataclasses.replace(config, {part}=dataclasses.replace(config.{part}, ...)))")
        dim = check_int("dim", dim, 1)
        # The flat names the nested configs spell differently are checked here, so an error names what was given.
        for name in ("router_bias", "shared_expert_gate"):
            if name in flat:
                check_bool(name, flat[name])
        if "num_shared_experts" in flat:
            flat["num_shared_experts"] = check_int("num_shared_experts", flat["num_shared_experts"], 0)
        if flat.get("shared_hidden_dim") is not None:
            check_int("shared_hidden_dim", flat["shared_hidden_dim"], 1)
        if router is None:
            router = _nested_from_flat("router", RouterConfig, flat)  # type: ignore[assignment]
        if experts is None:
            experts = _nested_from_flat("experts", ExpertsConfig, flat)  # type: ignore[assignment]
        if shared_experts is None and flat.get("num_shared_experts"):
            # num_shared_experts=0 is the flat form's "none": shared_hidden_dim and shared_expert_gate then do
            # nothing, as they never did.
            shared_experts = _nested_from_flat("shared_experts", SharedExpertsConfig, flat)  # type: ignore[assignment]
        for name, value, cls in (("router", router, RouterConfig), ("experts", experts, ExpertsConfig)):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a leanmoe.{cls.__name__}, got {type(value).__name__}")
        if shared_experts is not None and not isinstance(shared_experts, SharedExpertsConfig):
            raise TypeError(f"shared_experts must be a leanmoe.SharedExpertsConfig or None, got "
                            f"{type(shared_experts).__name__}")
        assert router is not None and experts is not None
        if router.num_experts != experts.num_experts:
            raise ValueError(f"router.num_experts and experts.num_experts must be equal (the router picks among these "
                             f"experts), got router.num_experts={router.num_experts}, "
                             f"experts.num_experts={experts.num_experts}")
        _set(self, "dim", dim)
        _set(self, "router", router)
        _set(self, "experts", experts)
        _set(self, "shared_experts", shared_experts)

    # --- the flat form's names, read-only (code written against the flat form reads these) ---------------------
    @property
    def hidden_dim(self) -> int:
        return self.experts.hidden_dim

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def activation(self) -> Activation:
        return self.experts.activation  # type: ignore[return-value]

    @property
    def gate_up_layout(self) -> GateUpLayout:
        return self.experts.gate_up_layout

    @property
    def bias(self) -> bool:
        return self.experts.bias

    @property
    def score_func(self) -> ScoreFunc:
        return self.router.score_func

    @property
    def norm_topk_prob(self) -> bool:
        return self.router.norm_topk_prob

    @property
    def route_scale(self) -> float:
        return self.router.route_scale

    @property
    def router_bias(self) -> bool:
        return self.router.bias

    @property
    def n_group(self) -> int:
        return self.router.n_group

    @property
    def topk_group(self) -> int:
        return self.router.topk_group

    @property
    def balance_bias(self) -> bool:
        return self.router.balance_bias

    @property
    def balance_bias_rate(self) -> float:
        return self.router.balance_bias_rate

    @property
    def aux_loss_coef(self) -> float:
        return self.router.aux_loss_coef

    @property
    def z_loss_coef(self) -> float:
        return self.router.z_loss_coef

    @property
    def num_shared_experts(self) -> int:
        return 0 if self.shared_experts is None else self.shared_experts.num_experts

    @property
    def shared_hidden_dim(self) -> int | None:
        return None if self.shared_experts is None else self.shared_experts.hidden_dim

    @property
    def shared_expert_gate(self) -> bool:
        return False if self.shared_experts is None else self.shared_experts.gated_output

    @property
    def backend(self) -> str:
        return self.experts.backend

    @property
    def save_percent(self) -> float:
        return self.experts.save_percent

    @property
    def gate_up_rows(self) -> int:
        """Rows of ``gate_up_proj`` per expert: 2I for gated activations, I otherwise."""
        return self.experts.gate_up_rows


PartConfig = TypeVar("PartConfig", RouterConfig, ExpertsConfig)


def split_config(config: object, dim: object, cls: type[PartConfig]) -> tuple[PartConfig, int]:
    """``(part, dim)`` for a module built from ``config``: a ``cls`` (a :class:`RouterConfig` or an
    :class:`ExpertsConfig`) with the model ``dim``, or a :class:`MoEConfig` (its part of type ``cls`` and its
    ``dim``; then ``dim`` must be None)."""
    if isinstance(config, MoEConfig):
        if dim is not None:
            raise ValueError(f"dim={dim!r} and a MoEConfig (dim={config.dim}) both give the model dim: pass dim= "
                             f"only with a {cls.__name__}")
        part = config.router if cls is RouterConfig else config.experts
        assert isinstance(part, cls)
        return part, config.dim
    if not isinstance(config, cls):
        raise TypeError(f"config must be a leanmoe.{cls.__name__} (with dim=) or a leanmoe.MoEConfig, got "
                        f"{type(config).__name__}")
    if dim is None:
        raise TypeError(f"dim is required with a {cls.__name__}: the model dim D is not part of it")
    return config, check_int("dim", dim, 1)
