"""Test helpers: random MoE problems and error-reporting comparisons.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses

import torch

from leanmoe.activations import Activation, resolve_activation

# Tolerances on the relative RMS error and the max abs error over max |ref|, per dtype.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 3e-2,
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, tol: float, name: str = "") -> None:
    """Passes when ``max|out - ref| / max|ref|`` and the relative RMS error are both under ``tol``.

    The message reports both, so a failure says how far off it is. NaN never passes.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: output has NaN ({int(torch.isnan(out64).sum())} elements)"
    if ref64.numel() == 0:
        return
    scale = ref64.abs().max().clamp_min(1e-30)
    max_err = ((out64 - ref64).abs().max() / scale).item()
    rms_err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    assert max_err <= tol and rms_err <= tol, (
        f"{name}: max abs err / max|ref| = {max_err:.3e}, relative RMS err = {rms_err:.3e}, tolerance {tol:.1e}")


@dataclasses.dataclass
class Problem:
    x_TD: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    activation: Activation
    gate_up_layout: str

    def inputs(self) -> list[torch.Tensor]:
        """Every differentiable input, in the order of ``moe_experts``'s positional arguments."""
        ts = [self.x_TD, self.topk_weights_TK, self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias]
        return [t for t in ts if t is not None]

    def args(self):
        return (self.x_TD, self.topk_ids_TK, self.topk_weights_TK, self.gate_up_proj, self.down_proj,
                self.gate_up_bias, self.down_bias)

    def kwargs(self):
        return {"activation": self.activation, "gate_up_layout": self.gate_up_layout}


def assert_deterministic(problem: Problem, backend: str, dy_TD: torch.Tensor) -> None:
    """Two runs of ``backend`` on the same inputs are bitwise identical: the output and every input gradient."""
    import leanmoe

    runs = []
    for _ in range(2):
        y = leanmoe.moe_experts(*problem.args(), **problem.kwargs(), backend=backend)
        runs.append([y, *torch.autograd.grad(y, problem.inputs(), dy_TD)])
    names = ["y", "dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"]
    for name, a, b in zip(names, *runs, strict=False):  # no bias: four gradients, the names run longer
        assert torch.equal(a, b), f"{backend}: {name} differs between two runs on the same inputs"


def xtx(rows_RC: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` of the rows in float64: the Hessian a GPTQ-style observer should accumulate."""
    r = rows_RC.double()
    return r.T @ r


def random_ids(T: int, E: int, K: int, routing: str = "uniform", generator=None) -> torch.Tensor:
    """``[T, K]`` distinct expert ids per token. ``routing``: ``uniform``, ``skewed`` (Zipf-like), ``one_expert``
    (every token's first choice is expert 0), ``few_experts`` (only experts 0..K-1 used: the rest get no tokens)."""
    if routing == "few_experts":
        return torch.stack([torch.randperm(K, generator=generator) for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.int64)
    logits = torch.randn(T, E, generator=generator)
    if routing == "skewed":
        logits = logits + torch.log(1.0 / (torch.arange(E) + 1.0))
    if routing == "one_expert":
        logits[:, 0] = 1e4
    return logits.topk(K, dim=-1).indices


def make_problem(T: int, D: int, I: int, E: int, K: int, *, activation="swiglu", layout="concatenated",
                 bias=False, dtype=torch.float32, device="cpu", routing="uniform", seed=None,
                 requires_grad=True) -> Problem:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    act = resolve_activation(activation)
    N = 2 * I if act.gated else I

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device).requires_grad_(
            requires_grad)

    ids = random_ids(T, E, K, routing, gen).to(device)
    weights = torch.rand(T, K, generator=gen).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return Problem(
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
