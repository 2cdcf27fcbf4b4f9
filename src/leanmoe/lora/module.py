"""``ExpertLoRA``: low-rank adapters on the stacked expert weights, one pair of factors per expert and target.

Legend: D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, r rank.

With ``s = alpha / rank``, expert e computes
    gate/up pre-activation ``x W_gu[e]^T + s * (x A_gu[e]^T) B_gu[e]^T (+ b1[e])``,
    expert output          ``h W_d[e]^T  + s * (h A_d[e]^T)  B_d[e]^T  (+ b2[e])``,
so the adapted weights are ``W_gu[e] + s B_gu[e] A_gu[e]`` and ``W_d[e] + s B_d[e] A_d[e]``. ``B`` starts at zero,
so a fresh adapter leaves every output unchanged; ``A`` starts like ``nn.Linear``'s weight (kaiming-uniform with
``a = sqrt(5)``, PEFT's choice too), per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

TARGETS = ("gate_up", "down")


def check_targets(targets) -> tuple[str, ...]:
    """Validates ``targets`` (a non-empty tuple/list of distinct names from ``TARGETS``), in TARGETS order."""
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
        raise TypeError(f"targets must be a tuple of names from {TARGETS}, got {targets!r}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be a non-empty tuple of distinct names from {TARGETS}, got {tuple(targets)!r}")
    return tuple(t for t in TARGETS if t in targets)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_lora_options(*, rank, alpha, dropout) -> None:
    _check_positive_int("rank", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite int or float, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a float in [0, 1], got {dropout!r}")


class ExpertLoRA(nn.Module):
    """Per-expert LoRA factors for the experts' ``gate_up`` and/or ``down`` weights.

    Parameters (present only for the chosen ``targets``):
        ``gate_up_A [E, r, D]``, ``gate_up_B [E, N, r]`` (rows in the experts' own gate/up layout),
        ``down_A [E, r, I]``, ``down_B [E, D, r]``.

    Pass it as ``leanmoe.moe_experts(..., lora=lora)``, or attach it to experts modules with
    :func:`leanmoe.lora.add_expert_lora`. ``merged`` is True while :func:`leanmoe.lora.merge_expert_lora` has folded
    ``s B A`` into the base weights; the expert compute then skips the adapter. ``dropout`` applies to the adapter's
    input (``x`` for ``gate_up``, ``h`` for ``down``) in training mode only.
    """

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, rank: int = 16, alpha: float = 32,
                 gated: bool = True, targets=TARGETS, dropout: float = 0.0, dtype=None, device=None) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            _check_positive_int(name, value)
        check_lora_options(rank=rank, alpha=alpha, dropout=dropout)
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {type(gated).__name__} {gated!r}")
        self.targets = check_targets(targets)
        self.num_experts, self.dim, self.hidden_dim, self.rank = num_experts, dim, hidden_dim, rank
        self.alpha, self.gated, self.dropout = float(alpha), gated, float(dropout)
        self.merged = False
        E, D, I, r = num_experts, dim, hidden_dim, rank
        N = 2 * I if gated else I
        kw = {"dtype": dtype, "device": device}
        self.gate_up_A = nn.Parameter(torch.empty(E, r, D, **kw)) if "gate_up" in self.targets else None
        self.gate_up_B = nn.Parameter(torch.empty(E, N, r, **kw)) if "gate_up" in self.targets else None
        self.down_A = nn.Parameter(torch.empty(E, r, I, **kw)) if "down" in self.targets else None
        self.down_B = nn.Parameter(torch.empty(E, D, r, **kw)) if "down" in self.targets else None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def gate_up_rows(self) -> int:
        return 2 * self.hidden_dim if self.gated else self.hidden_dim

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A [E, r, in], B [E, out, r])`` of ``target`` (``"gate_up"`` or ``"down"``), or None if not adapted."""
        A, B = (self.gate_up_A, self.gate_up_B) if target == "gate_up" else (self.down_A, self.down_B)
        return None if A is None or B is None else (A, B)

    def adapted(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` of a target this adapter has; a ``ValueError`` for one it does not."""
        factors = self.factors(target)
        if factors is None:
            raise ValueError(f"target {target!r} is not adapted; this adapter's targets are {self.targets}")
        return factors

    def reset_parameters(self) -> None:
        """A uniform in ``+-1/sqrt(in)`` per expert (``nn.Linear``'s law), B zero: a fresh adapter adds nothing."""
        for A, B in (self.adapted(t) for t in self.targets):
            # kaiming_uniform_(a=sqrt(5)) over one expert's [r, in] is uniform in +-1/sqrt(in) (nn.Linear's bound).
            bound = 1 / math.sqrt(A.shape[-1])
            nn.init.uniform_(A, -bound, bound)
            nn.init.zeros_(B)

    def delta(self, target: str) -> torch.Tensor:
        """``s * B @ A`` of ``target`` in fp32 (at least): ``[E, N, D]`` for gate_up, ``[E, D, I]`` for down."""
        A, B = self.adapted(target)
        compute = torch.promote_types(A.dtype, torch.float32)
        return torch.bmm(B.to(compute), A.to(compute)) * self.scale

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, rank={self.rank}, "
                f"alpha={self.alpha}, gated={self.gated}, targets={self.targets}, dropout={self.dropout}, "
                f"merged={self.merged}")
