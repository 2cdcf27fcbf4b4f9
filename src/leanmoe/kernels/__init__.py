"""Triton kernels and their launchers. Only ``@triton.jit`` kernels live here; the ops that use them are in
:mod:`leanmoe.experts.triton`.

The submodules import triton: import them lazily (inside functions) from code that must run without triton.

- :mod:`leanmoe.kernels.moe_common`: the on-device expert tile schedule, activations and their derivatives, configs.
- :mod:`leanmoe.kernels.moe_fwd`: the gather-fused gate/up GEMM (+ bias, activation), the grouped GEMM
  (+ bias, routing-weight scale, scatter to token order) used by the down projection and by dX, and the
  deterministic combine (sum of each token's K rows).
- :mod:`leanmoe.kernels.moe_bwd`: the fused backward of the gate/up GEMM and activation (recompute or load the
  pre-activation, ``W_down^T dy``, routing-weight gradient, activation derivative), the per-expert weight gradient
  (one program per output tile and expert, no atomics) and the per-expert bias gradient.
"""
