"""Expert parallelism on real process groups against the single-process reference: forward and every gradient.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k, P ranks in the expert-parallel group.

Each test world (gloo on the CPU, 2, 4 or 8 ranks) is spawned once with ``torch.multiprocessing`` and runs every
check of that size (``all_checks``); the world's one test reports every failing check with its ranks' tracebacks.
The 2- and 4-rank cases are hand-picked (``CASES_2``, ``CASES_4``); other world sizes get ``scaled_cases(P)``, whose
token counts and expert counts follow from P (8 ranks: E = 8, 16, 24 and 32, two ranks without tokens). In a case every
rank builds the same full layer (same seed) and the inputs of *every* rank, runs the plain layer on each rank's
tokens as the reference (loss = sum over ranks), and compares its own expert-parallel forward and gradients:
- output and ``dx`` on its own tokens;
- its expert shard's gradients (summed over data-parallel replicas of the shard, if any) with the reference slice;
- router and shared-expert gradients summed over all ranks (what data-parallel gradient reduction does).

The same checks run on GPUs under torchrun (NCCL, fp32 and bf16)::

    PYTHONPATH=src:. torchrun --nproc-per-node 2 tests/test_parallel_ep.py --device cuda

(any ``--nproc-per-node``: 2 and 4 take the hand-picked cases, other sizes ``scaled_cases``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import faulthandler
import json
import os
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leanmoe
from leanmoe.parallel.expert_parallel import ExpertParallelDispatcher, expert_parallel
from tests.helpers import TOLERANCES, assert_close


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    tokens: tuple[int, ...]  # tokens on each rank: uneven on purpose
    D: int = 16
    I: int = 8  # noqa: E741 - the legend's expert hidden dim
    E: int = 8
    K: int = 2
    routing: str = "uniform"  # uniform | skewed (Zipf-like router bias) | one_rank (every row to rank 0's experts)
    mask: bool = False
    batch_dims: bool = False  # x as [2, T/2, D] instead of [T, D]
    shared: bool = False
    bias: bool = False
    score_func: str = "softmax"
    backend: str = "auto"
    dtype: torch.dtype = torch.float32
    ep_size: int | None = None  # None: the whole world; else a (dp, ep) device mesh
    balance_bias: bool = False
    activation: str = "swiglu"


# Cases per world size. Each id names what it exercises.
CASES_2 = {
    "uniform": Case(tokens=(7, 4)),
    "skewed": Case(tokens=(9, 6), routing="skewed"),
    # Every row goes to rank 0's experts: rank 1 receives nothing and its expert gradients are zero.
    "one_rank": Case(tokens=(5, 6), routing="one_rank"),
    # Rank 1 has no tokens at all but still takes part in every collective.
    "empty_rank": Case(tokens=(6, 0)),
    "mask_batch_dims": Case(tokens=(8, 6), mask=True, batch_dims=True),
    "shared_gated_bias": Case(tokens=(7, 5), shared=True, bias=True),
    "sigmoid_E16_K4": Case(tokens=(10, 3), E=16, K=4, score_func="sigmoid"),
    "reference_backend": Case(tokens=(5, 8), backend="reference", bias=True),
    "bf16": Case(tokens=(12, 9), dtype=torch.bfloat16, shared=True),
}
CASES_4 = {
    "uniform": Case(tokens=(5, 9, 3, 7)),
    "empty_rank": Case(tokens=(5, 0, 9, 3), mask=True),
    "one_rank": Case(tokens=(4, 4, 4, 4), routing="one_rank"),
    "skewed_shared": Case(tokens=(6, 2, 8, 1), E=12, K=3, routing="skewed", shared=True),
    # DP x EP on a (2, 2) device mesh: experts replicated over "dp", sharded over "ep".
    "dp2_ep2_mesh": Case(tokens=(6, 3, 0, 5), ep_size=2, shared=True),
}


def uneven_tokens(world: int, *, empty: tuple[int, ...] = (), offset: int = 0) -> tuple[int, ...]:
    """Tokens per rank for any world size: 1 to 9, uneven and not monotonic (``offset`` shifts the pattern), and 0
    on the ranks in ``empty``."""
    return tuple(0 if r in empty else 1 + (5 * r + 3 + offset) % 9 for r in range(world))


def scaled_cases(world: int) -> dict[str, Case]:
    """The cases for a world of ``world`` ranks other than the hand-picked 2 and 4: the per-rank token lists and the
    expert counts follow from the world size, every E a multiple of it (L = E / P experts per rank)."""
    P = world
    return {
        "uniform": Case(tokens=uneven_tokens(P), E=2 * P),
        # Zipf-like router bias over E = 3P, K = 3: the last ranks' experts get few or no rows.
        "skewed_shared": Case(tokens=uneven_tokens(P, offset=2), E=3 * P, K=3, routing="skewed", shared=True),
        # K <= L: every row goes to rank 0's experts; ranks 1..P-1 receive nothing, their expert gradients are zero.
        "one_rank": Case(tokens=(4,) * P, E=2 * P, routing="one_rank"),
        # The first and the last rank have no tokens (with masks on the others), yet take part in every collective.
        "empty_ranks": Case(tokens=uneven_tokens(P, empty=(0, P - 1) if P >= 4 else (P - 1,), offset=4), E=2 * P,
                            mask=True, batch_dims=True),
        # L = 1: a single expert per rank, gated shared expert, expert biases, sigmoid scores.
        "one_expert_per_rank": Case(tokens=uneven_tokens(P, offset=1), E=P, bias=True, shared=True,
                                    score_func="sigmoid"),
        "sigmoid_E4P_K4": Case(tokens=uneven_tokens(P, offset=3), E=4 * P, K=4, score_func="sigmoid",
                               backend="reference"),
        "bf16": Case(tokens=uneven_tokens(P, offset=5), E=2 * P, dtype=torch.bfloat16, shared=True),
        # DP x EP on a (2, P/2) device mesh, with a rank without tokens.
        **({f"dp2_ep{P // 2}_mesh": Case(tokens=uneven_tokens(P, empty=(1,), offset=6), E=2 * P, ep_size=P // 2,
                                         shared=True)} if P >= 4 and P % 2 == 0 else {}),
    }


def cases_for(world: int) -> dict[str, Case]:
    return {2: CASES_2, 4: CASES_4}.get(world) or scaled_cases(world)


def default_num_experts(world: int) -> int:
    """E for the non-case checks: 8 as before on 2 and 4 ranks, two experts per rank beyond."""
    return max(8, 2 * world)


def make_layer(case: Case, seed: int, device) -> leanmoe.MoE:
    cfg = leanmoe.MoEConfig(dim=case.D, hidden_dim=case.I, num_experts=case.E, top_k=case.K, bias=case.bias,
                            score_func=case.score_func, router_bias=case.routing != "uniform",
                            num_shared_experts=1 if case.shared else 0, shared_expert_gate=case.shared,
                            aux_loss_coef=0.01, z_loss_coef=0.001, backend=case.backend,
                            balance_bias=case.balance_bias, activation=case.activation)
    torch.manual_seed(seed)
    layer = leanmoe.MoE(cfg).to(device=device, dtype=case.dtype)
    with torch.no_grad():
        if case.routing == "skewed":
            layer.router.bias.copy_(-2.0 * torch.log1p(torch.arange(case.E, dtype=torch.float32)))
        elif case.routing == "one_rank":
            boost = torch.zeros(case.E)
            boost[:case.K] = 20.0
            layer.router.bias.copy_(boost)
    return layer


def make_inputs(case: Case, rank: int, device):
    """Rank ``rank``'s tokens ``x``, mask and output cotangent ``dy`` (any rank can make any rank's inputs)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    T = case.tokens[rank]
    shape = (2, T // 2) if case.batch_dims else (T,)
    x = torch.randn(*shape, case.D, generator=gen).to(device=device, dtype=case.dtype)
    dy = torch.randn(*shape, case.D, generator=gen).to(device=device, dtype=case.dtype)
    mask = (torch.rand(*shape, generator=gen) > 0.3).to(device) if case.mask else None
    return x, mask, dy


def forward_backward(layer: leanmoe.MoE, x, mask, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x, mask)
    loss = (y.float() * dy.float()).sum() + layer.aux_loss
    return x, y, loss


def groups_for(case: Case, device_type: str):
    """(expert-parallel group, data-parallel group of the shard or None)."""
    world = dist.get_world_size()
    if case.ep_size is None or case.ep_size == world:
        return dist.group.WORLD, None
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device_type, (world // case.ep_size, case.ep_size), mesh_dim_names=("dp", "ep"))
    return mesh["ep"], mesh["dp"].get_group()


def check_case(case: Case, device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    tol = TOLERANCES[case.dtype]
    ep_mesh_or_group, dp_group = groups_for(case, torch.device(device).type)

    # The reference runs in fp32 on the same (for bf16: bf16-rounded) weights and inputs, so a bf16 case measures
    # the expert-parallel layer's own rounding, not the sum of two bf16 runs' roundings.
    ref = make_layer(case, seed=0, device=device).float()
    ref_xs, ref_ys, ref_loss = [], [], 0
    for r in range(world):
        x_r, mask_r, dy_r = make_inputs(case, r, device)
        x_r, y_r, loss_r = forward_backward(ref, x_r.float(), mask_r, dy_r.float())
        ref_xs.append(x_r)
        ref_ys.append(y_r)
        ref_loss = ref_loss + loss_r
    ref_loss.backward()

    layer = expert_parallel(make_layer(case, seed=0, device=device), ep_mesh_or_group)
    assert isinstance(layer.dispatcher, ExpertParallelDispatcher)
    shard = layer.experts.expert_shard
    assert layer.experts.gate_up_proj.shape[0] == case.E // shard.ep_size
    x, mask, dy = make_inputs(case, rank, device)
    if mask is not None:
        # Padding often holds NaN: a masked row must reach no output, gradient or other rank. The reference ran on
        # finite rows, so any NaN that leaks fails the comparisons below.
        x = x.masked_fill(~mask[..., None], float("nan"))
    metas, dispatch = [], layer.dispatcher.dispatch

    def recording_dispatch(*args, **kwargs):
        out = dispatch(*args, **kwargs)
        metas.append(out[3])
        return out

    layer.dispatcher.dispatch = recording_dispatch
    x, y, loss = forward_backward(layer, x, mask, dy)
    loss.backward()

    # Every collective first, every comparison after: a failing rank must not leave the others in a collective.
    pairs = [(f"rank {rank} y", y, ref_ys[rank], tol), (f"rank {rank} dx", x.grad, ref_xs[rank].grad, tol)]
    if mask is not None:
        # Masked tokens send no rows: the split sizes count K rows per kept token, and nothing else.
        assert sum(metas[0].input_splits) == case.K * int(mask.sum()), (metas[0].input_splits, mask.sum())
        assert metas[0].token_mask_T is None  # the experts see only kept rows
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask])), f"rank {rank}: masked output rows are not 0"
        assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask])), f"rank {rank}: masked dx rows are not 0"
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    for name, param in layer.experts.named_parameters():
        grad = param.grad.detach().to(torch.float32, copy=True)
        if dp_group is not None:  # the shard's data-parallel replicas each saw their own EP group's tokens
            dist.all_reduce(grad, group=dp_group)
        pairs.append((f"rank {rank} d{name}", grad, getattr(ref.experts, name).grad[lo:hi], tol))
    ref_params = dict(ref.named_parameters())
    replicated = [(n, p) for n, p in layer.named_parameters() if not n.startswith("experts.")]
    assert "router.weight" in dict(replicated)
    # Router gradients sum many tokens' terms of both signs, so bf16 rounding of the expert outputs shows up
    # amplified: the single-GPU bf16 layer itself is 3.1% (grouped_mm) / 4.4% (reference) RMS off the fp32
    # reference on the empty_rank case. Hence twice the bf16 tolerance for the replicated gradients.
    replicated_tol = 2 * tol if case.dtype == torch.bfloat16 else tol
    for name, param in replicated:
        grad = param.grad.detach().to(torch.float32, copy=True)
        dist.all_reduce(grad)
        pairs.append((f"rank {rank} d{name} (summed over ranks)", grad, ref_params[name].grad, replicated_tol))
    for name, out, expected, pair_tol in pairs:
        assert_close(out, expected, tol=pair_tol, name=name)


def check_balance_bias(device, backend: str = "auto") -> None:
    """The aux-loss-free bias update sums the load over the world: every rank ends with the reference's bias."""
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(tokens=tuple(3 + 4 * r for r in range(world)), E=default_num_experts(world), score_func="sigmoid",
                balance_bias=True, backend=backend)
    ref = make_layer(case, seed=0, device=device)
    layer = expert_parallel(make_layer(case, seed=0, device=device), None)
    assert layer.router.balance_group is dist.group.WORLD
    for r in range(world):
        ref(make_inputs(case, r, device)[0])
    layer(make_inputs(case, rank, device)[0])
    load_E = ref.router.expert_load
    expected_bias_E = ref.config.balance_bias_rate * torch.sign(load_E.mean() - load_E)
    assert layer.router.update_balance_bias()
    assert_close(layer.router.expert_bias, expected_bias_E, tol=0, name=f"rank {rank} expert_bias")


def check_state_dict(device, tmp: str, backend: str = "auto") -> None:
    """Save the full model from EP=P, load it on EP=1 (a plain layer) and back; if P >= 4, EP=P -> EP=Q for each
    Q = P/2, P/4, ... down to 2 (on a (P/Q, Q) mesh), then the smallest Q -> file -> EP=P."""
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(tokens=(5,) * world, E=default_num_experts(world), bias=True, shared=True, backend=backend)
    ref = make_layer(case, seed=0, device=device)
    layer = expert_parallel(make_layer(case, seed=0, device=device), None)

    # EP=P -> file: state_dict() gathers full [E, ...] tensors and leaves the local shards alone.
    tol = TOLERANCES[case.dtype]
    sd = layer.state_dict()
    ref_sd = ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    pairs = [(f"state_dict[{key}]", sd[key], ref_sd[key], 0) for key in ref_sd]
    assert layer.experts.down_proj.shape[0] == case.E // world
    path = os.path.join(tmp, "ep_full.pt")
    if rank == 0:
        torch.save(sd, path)
    dist.barrier()

    # file -> EP=1: a plain layer with another initialisation loads it and matches the reference.
    plain = make_layer(case, seed=1, device=device)
    plain.load_state_dict(torch.load(path, map_location=device))
    x, mask, _ = make_inputs(case, rank, device)
    ref_y = ref(x, mask)
    pairs.append(("EP=P -> EP=1 output", plain(x, mask), ref_y, tol))

    # EP=1 -> EP=P: the full reference state dict loads into a sharded layer of another initialisation.
    sharded = expert_parallel(make_layer(case, seed=2, device=device), None)
    sharded.load_state_dict(ref_sd)
    first = sharded.experts.expert_shard.first_expert
    pairs.append(("loaded shard", sharded.experts.gate_up_proj, ref.experts.gate_up_proj[first:][:case.E // world], 0))
    pairs.append(("EP=1 -> EP=P output", sharded(x, mask), ref_y, tol))

    if world >= 4:
        from torch.distributed.device_mesh import init_device_mesh
        ep = world // 2
        while ep >= 2 and world % ep == 0:  # EP=P -> EP=Q on a (P/Q, Q) mesh: Q = P/2, ..., 2
            sub_ep = ep
            mesh = init_device_mesh(torch.device(device).type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
            sub = expert_parallel(make_layer(case, seed=3, device=device), mesh["ep"])
            sub.load_state_dict(torch.load(path, map_location=device))
            assert sub.experts.down_proj.shape[0] == case.E // ep
            pairs.append((f"EP=P -> EP={ep} output", sub(x, mask), ref_y, tol))
            ep //= 2
        # EP=Q -> file -> EP=P (Q = 2 for P = 4, 8): the last EP=Q layer gathers full tensors over its own group.
        sub_sd = sub.state_dict()
        pairs += [(f"EP={sub_ep} state_dict[{key}]", sub_sd[key], ref_sd[key], 0) for key in ref_sd]
        path2 = os.path.join(tmp, "ep2_full.pt")
        if rank == 0:
            torch.save(sub_sd, path2)
        dist.barrier()
        back = expert_parallel(make_layer(case, seed=4, device=device), None)
        back.load_state_dict(torch.load(path2, map_location=device))
        pairs.append((f"EP={sub_ep} -> EP=P down_proj shard", back.experts.down_proj,
                      ref.experts.down_proj[first:][:case.E // world], 0))
        pairs.append((f"EP={sub_ep} -> EP=P output", back(x, mask), ref_y, tol))
    # Comparisons after every collective, so a failing rank leaves none of the others waiting.
    for name, out, expected, pair_tol in pairs:
        assert_close(out, expected, tol=pair_tol, name=f"rank {rank} {name}")


def check_fsdp2(device, backend: str = "auto") -> None:
    """FSDP2 shards the rest of the model over the world, the experts stay EP shards (``ignored_params``).

    Each rank's loss is its own; FSDP2 averages the replicated gradients over the world, while the expert gradients
    are sums over the world's tokens, so they are divided by the world size. Then every gradient is the gradient of
    the mean of the ranks' losses, as in the reference.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from leanmoe.parallel.expert_parallel import expert_parameters
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(tokens=tuple(4 + 3 * r for r in range(world)), shared=True, backend=backend)

    def make_model(seed):
        moe = make_layer(case, seed=seed, device=device)  # seeds, then the linear layer draws after it
        return torch.nn.Sequential(torch.nn.Linear(case.D, case.D, device=device), moe)

    ref = make_model(0)
    ref_loss = 0
    for r in range(world):
        x, _, dy = make_inputs(case, r, device)
        ref_loss = ref_loss + (ref(x) * dy).sum() / world
    ref_loss.backward()

    model = make_model(0)
    expert_parallel(model[1], None)
    mesh = init_device_mesh(torch.device(device).type, (world,), mesh_dim_names=("dp",))
    fully_shard(model, mesh=mesh, ignored_params=set(expert_parameters(model)))
    x, _, dy = make_inputs(case, rank, device)
    (model(x) * dy).sum().backward()
    for p in expert_parameters(model):
        p.grad.div_(world)

    shard = model[1].experts.expert_shard
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    ref_params = dict(ref.named_parameters())
    pairs = []
    for name, param in model.named_parameters():
        if name.startswith("1.experts."):
            pairs.append((name, param.grad, ref_params[name].grad[lo:hi]))
        else:
            pairs.append((name, param.grad.full_tensor(), ref_params[name].grad))
    assert len(expert_parameters(model)) == 2
    for name, out, expected in pairs:
        assert_close(out, expected, tol=TOLERANCES[case.dtype], name=f"rank {rank} d{name}")


def check_meta_init(device, backend: str = "auto") -> None:
    """Shard a layer built on the meta device, materialise it, load the full reference state dict: same output."""
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(tokens=(6,) * world, E=default_num_experts(world), shared=True, backend=backend)
    ref = make_layer(case, seed=0, device=device)
    layer = leanmoe.MoE(ref.config, device="meta")
    expert_parallel(layer, None)
    assert layer.experts.gate_up_proj.is_meta and layer.experts.gate_up_proj.shape[0] == case.E // world
    layer.to_empty(device=device)
    layer.load_state_dict(ref.state_dict())
    x, mask, _ = make_inputs(case, rank, device)
    assert_close(layer(x, mask), ref(x, mask), tol=TOLERANCES[case.dtype], name=f"rank {rank} meta-init output")


def check_errors(device) -> None:
    world = dist.get_world_size()
    case = Case(tokens=(1,) * world, E=2 * world + 1)  # odd E: not divisible by an even group size
    with pytest.raises(ValueError, match=rf"num_experts must be divisible .* num_experts={2 * world + 1}, "
                                         rf"group size={world}"):
        expert_parallel(make_layer(case, seed=0, device=device), None)
    layer = expert_parallel(make_layer(Case(tokens=(1,) * world, E=2 * world), seed=0, device=device), None)
    with pytest.raises(ValueError, match="already applied"):
        expert_parallel(layer, None)
    if world >= 4:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(torch.device(device).type, (2, world // 2), mesh_dim_names=("dp", "ep"))
        with pytest.raises(ValueError, match="1-D device mesh"):
            expert_parallel(make_layer(case, seed=0, device=device), mesh)


def check_disagreement(device) -> None:
    """Ranks built differently: every rank raises the same ValueError naming what differs and on which ranks; no
    hang, no abort, the layer left unsharded. Then the allowed differences: per-rank backend, and meta layers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    base = Case(tokens=(1,) * world, E=default_num_experts(world))
    # The last rank builds the base case with these changes (or perturbs its router weights); each key is what the
    # error must name.
    disagreements = {
        "num_experts": {"E": 2 * base.E},
        "dim": {"D": 8},
        "config.router.top_k": {"K": 3},
        "dtype": {"dtype": torch.bfloat16},
        "activation": {"activation": "geglu"},  # gated like swiglu: same shapes, only the activation differs
        "expert biases": {"bias": True},
        "values of router.weight": {},
    }
    others, odd = list(range(world - 1)), [world - 1]
    messages = {}
    for what, changes in disagreements.items():
        case = dataclasses.replace(base, **changes) if rank == world - 1 else base
        layer = make_layer(case, seed=0, device=device)
        if what == "values of router.weight" and rank == world - 1:
            with torch.no_grad():
                layer.router.weight[0, 0] += 1e-3
        with pytest.raises(ValueError, match="the same full layer on every rank") as err:
            expert_parallel(layer, None, timeout=60)
        message = str(err.value)
        assert f"{what}: " in message and f"on ranks {others}" in message and f"on ranks {odd}" in message, message
        assert layer.experts.gate_up_proj.shape[0] == case.E, f"{what}: the layer was sharded"
        assert getattr(layer.experts, "expert_shard", None) is None, what
        messages[what] = message
    gathered = [None] * world
    dist.all_gather_object(gathered, messages)
    assert all(g == messages for g in gathered), "the ranks raised different messages"
    assert "build the layer from the same seed" in messages["values of router.weight"]
    assert "build the layer from the same seed" not in messages["num_experts"]

    # Per-rank backends agree (a rank's compute choice); a different seed passes with check_weights=False, and a
    # meta-device layer has no values to compare.
    layer = make_layer(dataclasses.replace(base, backend="reference" if rank % 2 else "auto"), seed=rank,
                       device=device)
    expert_parallel(layer, None, check_weights=False)
    meta = leanmoe.MoE(make_layer(base, seed=0, device=device).config, device="meta")
    expert_parallel(meta, None)
    assert meta.experts.gate_up_proj.is_meta


def check_agreement_timeout(device) -> None:
    """A rank that joins the agreement check late makes the others fail within their timeout, not hang."""
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(tokens=(1,) * world, E=2 * world)
    layer = make_layer(case, seed=0, device=device)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"joined the agreement check within 0\.5 s"):
            expert_parallel(layer, None, timeout=0.5)
        assert time.monotonic() - start < 3, "the timeout did not bound the wait"
        assert getattr(layer.experts, "expert_shard", None) is None
    else:
        time.sleep(4)
        expert_parallel(layer, None)  # completes rank 0's pending all-gather; rank 0's fingerprint agrees
    dist.barrier()
    with pytest.raises(ValueError, match="timeout must be a positive finite number"):
        expert_parallel(make_layer(case, seed=0, device=device), None, timeout=0)


def all_checks(world: int, tmp: str, device="cpu", dtypes=None, backend=None) -> dict:
    """Name -> zero-argument check, for a world of ``world`` ranks. ``dtypes`` overrides each case's dtype,
    ``backend`` each case's experts backend."""
    cases = cases_for(world)
    checks = {}
    for name, case in cases.items():
        for dtype in dtypes or [case.dtype]:
            c = dataclasses.replace(case, dtype=dtype, backend=backend or case.backend)
            checks[f"{name}-{str(dtype).removeprefix('torch.')}" if dtypes else name] = (
                lambda c=c: check_case(c, device))
    checks["balance_bias"] = lambda: check_balance_bias(device, backend or "auto")
    checks["state_dict"] = lambda: check_state_dict(device, tmp, backend or "auto")
    checks["meta_init"] = lambda: check_meta_init(device, backend or "auto")
    checks["errors"] = lambda: check_errors(device)
    checks["disagreement"] = lambda: check_disagreement(device)
    checks["agreement_timeout"] = lambda: check_agreement_timeout(device)
    if world == 2:
        checks["fsdp2"] = lambda: check_fsdp2(device, backend or "auto")
    return checks


def _poison_empty() -> None:
    # As tests/conftest.py does in the main process: uninitialised float memory is NaN.
    from tests.conftest import _empty, _empty_like, _new_empty, _poison
    torch.empty = lambda *a, **k: _poison(_empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(_empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: _poison(_new_empty(self, *a, **k))


def run_checks(checks: dict, verbose: bool = False) -> dict[str, str | None]:
    """Runs every check on this rank; a check's result is None or this rank's traceback."""
    results = {}
    for name, check in checks.items():
        if verbose:
            print(f"[rank {dist.get_rank()}] {name} ...", flush=True)
        try:
            check()
            results[name] = None
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - the traceback is the test's failure message
            results[name] = traceback.format_exc()
        if verbose:
            print(f"[rank {dist.get_rank()}] {name} {'ok' if results[name] is None else 'FAILED'}", flush=True)
    return results


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    _poison_empty()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = run_checks(all_checks(world, tmp))
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_world(world: int) -> dict[str, list[str]]:
    """Runs every check in a fresh gloo world; returns name -> the failing ranks' tracebacks."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), tmp), nprocs=world, join=True)
        per_rank = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
    return {name: [f"[rank {r}] {res[name]}" for r, res in enumerate(per_rank) if res[name]] for name in per_rank[0]}


def _check_world(world: int) -> None:
    # One test per world: a spawned world is the expensive part, and under pytest-xdist a parametrized test would
    # be split over workers, each spawning the world again.
    results = _spawn_world(world)
    failed = {name: errs for name, errs in results.items() if errs}
    passed = sorted(set(results) - set(failed))
    assert not failed, (f"{len(failed)} of {len(results)} checks failed: {sorted(failed)} (passed: {passed})\n"
                        + "\n".join(f"--- {name}\n" + "\n".join(errs) for name, errs in failed.items()))


def test_gloo_world_2():
    """Every check in ``all_checks(2)``: CASES_2, balance bias, state_dict EP=2 <-> EP=1, errors, FSDP2."""
    _check_world(2)


def test_gloo_world_4():
    """Every check in ``all_checks(4)``: CASES_4 (incl. a 2x2 dp/ep mesh), balance bias, state_dict
    EP=4 -> EP=1, EP=1 -> EP=4, EP=4 -> EP=2, EP=2 -> EP=4, meta init, errors."""
    _check_world(4)


def test_gloo_world_8():
    """Every check in ``all_checks(8)``: ``scaled_cases(8)`` (uniform and skewed routing, all rows to one rank, two
    ranks without tokens, one expert per rank, sigmoid/K=4, bf16, a 2x4 dp/ep mesh), balance bias, state_dict
    EP=8 -> EP=1, EP=1 -> EP=8, EP=8 -> EP=4 and EP=2, EP=2 -> EP=8, meta init, errors."""
    _check_world(8)


def test_scaled_cases_shapes():
    """The generated cases fit their world: one token count per rank, E a multiple of the EP group size, K <= E,
    one_rank routing really lands on rank 0's experts, and the named ranks are empty."""
    for world in (2, 3, 4, 6, 8, 16):
        cases = scaled_cases(world)
        for name, case in cases.items():
            assert len(case.tokens) == world, name
            assert case.E % (case.ep_size or world) == 0 and case.K <= case.E, name
            if case.routing == "one_rank":
                assert case.K <= case.E // (case.ep_size or world), name
        assert 0 in cases["empty_ranks"].tokens and sum(cases["empty_ranks"].tokens) > 0
    assert scaled_cases(8)["empty_ranks"].tokens[0] == scaled_cases(8)["empty_ranks"].tokens[7] == 0
    assert cases_for(2) is CASES_2 and cases_for(4) is CASES_4


def test_needs_an_initialised_process_group():
    layer = leanmoe.MoE(leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2))
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        expert_parallel(layer)


def main() -> None:
    """Under torchrun: every check of this world size on ``--device`` (NCCL on CUDA), in fp32 and bf16."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backend", default=None, help="experts backend for every case (default: each case's)")
    parser.add_argument("--hang-dump-s", type=float, default=0, help="dump every thread's stack after this long")
    args = parser.parse_args()
    if args.hang_dump_s:
        faulthandler.dump_traceback_later(args.hang_dump_s, exit=True)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = args.device
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_list = [tmp]
        dist.broadcast_object_list(tmp_list)  # one host: every rank uses rank 0's folder
        checks = all_checks(world, tmp_list[0], device, dtypes=[getattr(torch, d) for d in args.dtypes],
                            backend=args.backend)
        results = run_checks(checks, verbose=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        dist.barrier()
    failed = 0
    if rank == 0:
        for name in results:
            errs = [f"[rank {r}] {res[name]}" for r, res in enumerate(gathered) if res[name]]
            failed += bool(errs)
            print(f"{'FAIL' if errs else 'ok  '} {name}", flush=True)
            for e in errs:
                print(e, flush=True)
        print(f"{len(results) - failed} passed, {failed} failed (world {world}, {device}, backend "
              f"{args.backend or 'per case'}, torch {torch.__version__})", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
