"""Seeded random MoE problems, routings, tolerances per dtype and an error-reporting ``assert_close``.

One public place for what the tests, the benchmarks and a backend author need to check an expert layer against the
reference backend. Every builder takes a ``seed`` and draws from its own ``torch.Generator``: the same arguments give
the same tensors, whatever the global RNG state. Only ``make_problem(seed=None)`` reads that state, once, for its seed.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I plain), E experts, K top-k.
"""

from __future__ import annotations

import dataclasses

import torch

from leanmoe.activations import Activation, resolve_activation

# ------------------------------------------------------------------------------------------------ tolerances
# Two comparisons, two tables, on purpose:
# - like for like (a backend in dtype X against the reference backend in dtype X, as the tests do): both sides round
#   the same way, so the bound is tight, and it is checked on the max abs error over max|ref| *and* on the relative
#   RMS error (``assert_close``).
# - against an fp32 reference (the bench upcasts the same inputs and runs the reference in fp32): the error is the
#   low-precision rounding itself, measured as a relative RMS error only; fp32 allows for a different summation
#   order, not for TF32.

#: Same-dtype comparisons (tests): bound on max|out - ref| / max|ref| and on the relative RMS error.
TOLERANCES_SAME_DTYPE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 3e-2,
}

#: Comparisons against the reference backend run in fp32 on upcast inputs (``leanmoe bench``, benchmarks/peers.py,
#: the LoRA bench): bound on the relative RMS error ``||out - ref|| / ||ref||``.
TOLERANCES_VS_FP32_REFERENCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}

#: A whole HF model's logits against the same model run in fp32 with eager experts (``leanmoe bench --hf``): many
#: layers compound the rounding, so the bound is looser than one layer's; relative RMS error.
LOGITS_TOLERANCES_VS_FP32_MODEL: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 4e-2,
}


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max|out - ref| / max|ref|, ||out - ref|| / ||ref||)`` in float64; NaN/inf in ``out`` give NaN/inf.

    ``out`` and ``ref``: the same shape, any dtypes and devices. Empty tensors give ``(0.0, 0.0)``.
    """
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if ref64.numel() == 0:
        return 0.0, 0.0
    scale = ref64.abs().max().clamp_min(1e-30)
    max_err = ((out64 - ref64).abs().max() / scale).item()
    rms_err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    return max_err, rms_err


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, tol: float | None = None, name: str = "") -> None:
    """Passes when ``max|out - ref| / max|ref|`` and the relative RMS error are both at most ``tol``.

    ``tol`` defaults to ``TOLERANCES_SAME_DTYPE[out.dtype]``. The message reports both errors, so a failure says how
    far off it is. NaN never passes (nor does inf: its error is inf or NaN).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if tol is None:
        tol = TOLERANCES_SAME_DTYPE[out.dtype]
    nan = torch.isnan(out.detach())
    assert not nan.any(), f"{name}: output has NaN ({int(nan.sum())} elements)"
    max_err, rms_err = errors(out, ref)
    assert max_err <= tol and rms_err <= tol, (  # NaN compares False: a NaN reference fails too
        f"{name}: max abs err / max|ref| = {max_err:.3e}, relative RMS err = {rms_err:.3e}, tolerance {tol:.1e}")


# ------------------------------------------------------------------------------------------------ routings

#: The routing kinds of ``random_ids``: ``uniform``, ``skewed`` (Zipf-like), ``one_expert`` (every token's first
#: choice is expert 0: with K=1 all tokens on one expert), ``few_experts`` (only experts 0..K-1 used: the other
#: experts get no tokens).
ROUTINGS = ("uniform", "skewed", "one_expert", "few_experts")


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def random_ids(T: int, E: int, K: int, routing: str = "uniform", generator: torch.Generator | None = None, *,
               seed: int = 0) -> torch.Tensor:
    """``[T, K]`` int64 CPU tensor of distinct expert ids per token, drawn as ``routing`` says (see ``ROUTINGS``).

    Draws from ``generator`` when given (to continue a stream), else from a fresh one seeded with ``seed``.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    gen = _generator(generator, seed)
    if routing == "few_experts":
        return torch.stack([torch.randperm(K, generator=gen) for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.int64)
    logits = torch.randn(T, E, generator=gen)
    if routing == "skewed":
        logits = logits + torch.log(1.0 / (torch.arange(E) + 1.0))
    if routing == "one_expert":
        logits[:, 0] = 1e4
    return logits.topk(K, dim=-1).indices


def random_token_mask(T: int, keep_fraction: float = 0.5, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """``[T]`` bool keep-mask (True = keep) on ``device``; each token kept with probability ``keep_fraction``
    (0.0: all masked, 1.0: all kept)."""
    return (torch.rand(T, generator=torch.Generator().manual_seed(seed)) < keep_fraction).to(device)


# ------------------------------------------------------------------------------------------------ problems


@dataclasses.dataclass
class Problem:
    """One random ``moe_experts`` call: ``x_TD [T, D]``, ``topk_ids_TK [T, K]`` int64, ``topk_weights_TK [T, K]``,
    ``gate_up_proj [E, N, D]``, ``down_proj [E, D, I]``, optional ``gate_up_bias [E, N]`` / ``down_bias [E, D]``,
    and an optional ``token_mask_T [T]`` bool (passed by ``kwargs()`` only when set)."""

    x_TD: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    activation: Activation
    gate_up_layout: str
    token_mask_T: torch.Tensor | None = None

    def inputs(self) -> list[torch.Tensor]:
        """Every differentiable input, in the order of ``moe_experts``'s positional arguments."""
        ts = [self.x_TD, self.topk_weights_TK, self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias]
        return [t for t in ts if t is not None]

    def args(self) -> tuple:
        """``moe_experts``'s seven positional arguments."""
        return (self.x_TD, self.topk_ids_TK, self.topk_weights_TK, self.gate_up_proj, self.down_proj,
                self.gate_up_bias, self.down_bias)

    def kwargs(self) -> dict:
        """``activation`` and ``gate_up_layout`` (and ``token_mask`` when the problem has one)."""
        kw = {"activation": self.activation, "gate_up_layout": self.gate_up_layout}
        if self.token_mask_T is not None:
            kw["token_mask"] = self.token_mask_T
        return kw

    def expert_weights(self):
        """The weights as a ``leanmoe.ExpertWeights`` (the backend contract)."""
        from leanmoe.experts.weights import ExpertWeights

        return ExpertWeights(gate_up_proj=self.gate_up_proj, down_proj=self.down_proj,
                             gate_up_bias=self.gate_up_bias, down_bias=self.down_bias, activation=self.activation,
                             gate_up_layout=self.gate_up_layout)


def make_problem(T: int, D: int, I: int, E: int, K: int, *, activation="swiglu", layout="concatenated",
                 bias=False, dtype=torch.float32, device="cpu", routing="uniform", seed: int | None = None,
                 requires_grad=True, keep_fraction: float | None = None) -> Problem:
    """A random ``Problem`` of ``T`` tokens routed to ``K`` of ``E`` experts (``D`` model dim, ``I`` hidden dim).

    ``activation``: any name ``resolve_activation`` takes (gated ones give ``N = 2I``); ``layout``: the gate/up
    layout (``concatenated`` or ``interleaved``); ``bias``: both biases; ``dtype``/``device``: of every float
    tensor (ids are int64 on ``device``; ``device="meta"`` gives meta tensors); ``routing``: one of ``ROUTINGS``;
    ``keep_fraction``: None for no token mask, else a random ``[T]`` keep-mask with that keep probability.
    Weights are scaled by ``1/sqrt(fan_in)`` so outputs stay O(1). Reproducible from ``seed``; ``seed=None`` takes
    one from torch's default generator, which the test suite seeds per test (``tests/conftest.py``), so each test
    draws its own inputs and ``LEANMOE_TEST_SEED`` changes them all.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    gen = torch.Generator().manual_seed(seed)
    act = resolve_activation(activation)
    N = 2 * I if act.gated else I

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device).requires_grad_(
            requires_grad)

    ids = random_ids(T, E, K, routing, gen).to(device)
    weights = torch.rand(T, K, generator=gen).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    problem = Problem(
        x_TD=rand(T, D),
        topk_ids_TK=ids,
        topk_weights_TK=weights,
        gate_up_proj=rand(E, N, D, scale=D ** -0.5),
        down_proj=rand(E, D, I, scale=I ** -0.5),
        gate_up_bias=rand(E, N, scale=0.1) if bias else None,
        down_bias=rand(E, D, scale=0.1) if bias else None,
        activation=act,
        gate_up_layout=layout,
    )
    if keep_fraction is not None:
        problem.token_mask_T = random_token_mask(T, keep_fraction, seed=seed + 1, device=device)
    return problem


def assert_deterministic(problem: Problem, backend: str, dy_TD: torch.Tensor) -> None:
    """Two runs of ``backend`` on the same inputs are bitwise identical: the output and every input gradient.

    ``dy_TD [T, D]``: the output gradient, in the problem's dtype and device.
    """
    import leanmoe

    runs = []
    for _ in range(2):
        y = leanmoe.moe_experts(*problem.args(), **problem.kwargs(), backend=backend)
        runs.append([y, *torch.autograd.grad(y, problem.inputs(), dy_TD)])
    names = ["y", "dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"]
    for name, a, b in zip(names, *runs, strict=False):  # no bias: four gradients, the names run longer
        assert torch.equal(a, b), f"{backend}: {name} differs between two runs on the same inputs"


__all__ = [
    "LOGITS_TOLERANCES_VS_FP32_MODEL",
    "ROUTINGS",
    "TOLERANCES_SAME_DTYPE",
    "TOLERANCES_VS_FP32_REFERENCE",
    "Problem",
    "assert_close",
    "assert_deterministic",
    "errors",
    "make_problem",
    "random_ids",
    "random_token_mask",
]
