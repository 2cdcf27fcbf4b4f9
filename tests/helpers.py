"""Test helpers: the public ``leanmoe.testing`` builders and comparisons, re-exported, plus test-only helpers.

``TOLERANCES`` is ``leanmoe.testing.TOLERANCES_SAME_DTYPE``: the tests compare a backend with the reference backend in
the same dtype.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k.
"""

from __future__ import annotations

import torch

from leanmoe.testing import (  # noqa: F401  (re-exported: the tests import them from here)
    ROUTINGS,
    TOLERANCES_SAME_DTYPE,
    TOLERANCES_VS_FP32_REFERENCE,
    Problem,
    assert_close,
    assert_deterministic,
    errors,
    make_problem,
    random_ids,
    random_token_mask,
)

TOLERANCES = TOLERANCES_SAME_DTYPE


def xtx(rows_RC: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` of the rows ``[R, C]`` in float64 ``[C, C]``: the Hessian a GPTQ-style observer should accumulate."""
    r = rows_RC.double()
    return r.T @ r
