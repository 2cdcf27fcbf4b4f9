"""Triton kernels, their launchers, their launch policy and a plain torch reference per launcher. The ops that
use them (custom ops, autograd) are in :mod:`leanmoe.experts.triton`.

A launcher checks its inputs (``ValueError`` naming the field, the bad value and the expected one), allocates, then
launches. The submodules import triton, except :mod:`~leanmoe.kernels.policy` and
:mod:`~leanmoe.kernels.reference`: import the others lazily (inside functions) from code that must run without
triton.

- :mod:`leanmoe.kernels.moe_common`: the on-device expert tile schedule, activations and their derivatives, configs.
- :mod:`leanmoe.kernels.moe_fwd`: the gather-fused gate/up GEMM (+ bias, activation), the grouped GEMM
  (+ bias, routing-weight scale, scatter to token order) used by the down projection and by dX, and the
  deterministic combine (sum of each token's K rows).
- :mod:`leanmoe.kernels.moe_bwd`: the fused backward of the gate/up GEMM and activation (recompute or load the
  pre-activation, ``W_down^T dy``, routing-weight gradient, activation derivative), the per-expert weight gradient
  (one program per output tile and expert, no atomics) and the per-expert bias gradient.
- :mod:`leanmoe.kernels.policy`: the launch policy: saved pre-activation rows, column chunks of the down projection
  and dX with their combine.
- :mod:`leanmoe.kernels.reference`: each launcher in a few lines of torch, the ground truth of tests/test_kernels.py.
"""
