"""Expert parallelism over ``torch.distributed``: experts sharded over a process group, tokens moved by all-to-all.

Legend: T tokens on this rank, D model dim, E experts (global), L experts per rank (E / P), K top-k, P ranks in the
expert-parallel group, R routed rows on this rank (T*K), S rows this rank's experts receive (from every rank).

:func:`expert_parallel` shards ``layer.experts`` in place (rank p keeps experts ``[p*L, (p+1)*L)``) and swaps
``layer.dispatcher`` for an :class:`ExpertParallelDispatcher`. A forward then runs:

1. plan (no host sync): stable sort of the R routed rows by global expert id, which groups them by destination rank
   and, inside a rank, by local expert; ``send_counts_PL`` counts rows per (destination rank, local expert);
2. exchange counts: an all-to-all of ``send_counts_PL`` gives ``recv_counts_PL`` (rows per source rank and local
   expert); both come to the host in one copy: **the one host sync per forward** (all-to-all split sizes must be
   host integers);
3. dispatch: gather the rows' tokens in sorted order and all-to-all them (autograd-aware) to the expert owners;
   local expert ids of the received rows follow from ``recv_counts_PL`` (no ids travel);
4. experts: ``layer.experts`` runs on the S received rows with K=1 and weight 1, with any leanmoe backend;
5. combine: all-to-all back to the source ranks (the backward of step 3 runs the other way), undo the sort, and
   ``y_t = sum_k w_tk * out_tk`` on the source rank, so routing-weight gradients never leave it.
Backward runs the two all-to-alls in reverse with the split sizes already known: no host sync.

Router and shared experts stay replicated. Their gradients come from this rank's tokens only, like any
data-parallel replica; the expert shards' gradients already hold every rank's contribution (the all-to-all backward
brings them home). See ``docs/EXPERT_PARALLEL.md`` for the gradient-reduction rules and FSDP2 composition.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from leanmoe.parallel.dispatcher import DispatchMeta, LocalDispatcher

#: The ``layer.experts`` parameters that are split along dim 0 (the expert dim); absent biases are skipped.
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """Where this rank's experts sit: ``Shard(0)`` of each expert parameter over ``group``.

    Rank ``ep_rank`` of ``ep_size`` holds global experts ``[first_expert, first_expert + num_local_experts)``.
    """

    group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    num_experts: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local_experts


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """The index logic of one dispatch, computed on the device without a host sync (step 1).

    ``sorted_rows_R``: routed row (``t * K + k``) at each sorted position, rows of one destination rank contiguous,
    ordered by local expert then token; ``send_counts_PL``: rows for each (destination rank, local expert).
    """

    sorted_rows_R: torch.Tensor  # int64
    send_counts_PL: torch.Tensor  # int64

    def inverse_R(self) -> torch.Tensor:
        """Sorted position of each routed row (the inverse permutation of ``sorted_rows_R``)."""
        R = self.sorted_rows_R.numel()
        positions_R = torch.arange(R, device=self.sorted_rows_R.device)
        return torch.empty_like(self.sorted_rows_R).scatter_(0, self.sorted_rows_R, positions_R)


def plan_dispatch(topk_ids_TK: torch.Tensor, num_experts: int, ep_size: int) -> DispatchPlan:
    """Sorts the routed rows by global expert (hence by destination rank) and counts them per (rank, local expert).

    ``topk_ids_TK [T, K]`` holds global expert ids in ``[0, num_experts)``; experts are split contiguously, so expert
    ``e`` lives on rank ``e // (num_experts // ep_size)`` as local expert ``e % (num_experts // ep_size)``.
    """
    ids_R = topk_ids_TK.reshape(-1).long()
    sorted_rows_R = torch.sort(ids_R, stable=True).indices
    # scatter_add of int64 ones counts with a fixed output size: no host sync (bincount syncs).
    ones_R = torch.ones((), dtype=torch.int64, device=ids_R.device).expand(ids_R.numel())
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_R.device).scatter_add_(0, ids_R, ones_R)
    return DispatchPlan(sorted_rows_R, counts_E.view(ep_size, num_experts // ep_size))


def received_expert_ids(recv_counts_PL: torch.Tensor, num_received: int) -> torch.Tensor:
    """Local expert id of each received row, ``[S]`` int64.

    Rows arrive grouped by source rank, and within one source by local expert (that rank's sort), so the ids are
    ``0..L-1`` repeated P times, each repeated by its count. ``num_received`` (S, already on the host) spares
    ``repeat_interleave`` a sync.
    """
    P, L = recv_counts_PL.shape
    local_ids_PL = torch.arange(L, device=recv_counts_PL.device).repeat(P)
    return torch.repeat_interleave(local_ids_PL, recv_counts_PL.reshape(-1), output_size=num_received)


@dataclasses.dataclass(frozen=True)
class ExpertParallelMeta(DispatchMeta):
    """State carried from :meth:`ExpertParallelDispatcher.dispatch` to :meth:`~ExpertParallelDispatcher.combine`."""

    plan: DispatchPlan
    topk_weights_TK: torch.Tensor
    input_splits: tuple[int, ...]  # rows sent to each rank (host ints)
    output_splits: tuple[int, ...]  # rows received from each rank (host ints)


def _all_to_all_rows(x_ND: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of rows; its backward is the all-to-all the other way.

    ``all_to_all_single_autograd`` is what torch 2.13's deprecation of ``torch.distributed.nn.functional
    .all_to_all_single`` points to; it is asynchronous (the wait happens at the result's first use).
    """
    return all_to_all_single_autograd(x_ND.contiguous(), list(output_splits), list(input_splits), group)


class ExpertParallelDispatcher(LocalDispatcher):
    """Moves routed rows to the ranks that own their experts and back (see the module docstring for the steps).

    ``dispatch(x_TD, topk_ids_TK, topk_weights_TK)`` returns ``x_SD``, local ids ``[S, 1]``, unit weights ``[S, 1]``
    and an :class:`ExpertParallelMeta`; ``combine(y_SD, meta)`` returns ``y_TD``. Every rank of the group must call
    both (and run backward through them) the same number of times, in the same order: they are collectives.
    """

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ExpertParallelMeta]:
        shard = self.shard
        T, K = topk_ids_TK.shape
        plan = plan_dispatch(topk_ids_TK, shard.num_experts, shard.ep_size)

        recv_counts_PL = torch.empty_like(plan.send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, plan.send_counts_PL, group=shard.group)
        # The one host sync of the forward: split sizes of the row all-to-alls (both directions, and backward).
        counts_2PL = torch.stack([plan.send_counts_PL, recv_counts_PL]).cpu()
        input_splits = tuple(counts_2PL[0].sum(1).tolist())
        output_splits = tuple(counts_2PL[1].sum(1).tolist())
        S = sum(output_splits)

        sorted_tokens_R = torch.div(plan.sorted_rows_R, K, rounding_mode="floor")
        x_RD = x_TD.index_select(0, sorted_tokens_R)
        x_SD = _all_to_all_rows(x_RD, output_splits, input_splits, shard.group)
        ids_S1 = received_expert_ids(recv_counts_PL, S)[:, None]
        # Weight 1: the routing weights are applied in `combine`, on the source rank.
        weights_S1 = torch.ones(S, 1, dtype=x_TD.dtype, device=x_TD.device)
        meta = ExpertParallelMeta(num_tokens=T, plan=plan, topk_weights_TK=topk_weights_TK,
                                  input_splits=input_splits, output_splits=output_splits)
        return x_SD, ids_S1, weights_S1, meta

    def combine(self, y_SD: torch.Tensor, meta: ExpertParallelMeta) -> torch.Tensor:
        T, K = meta.topk_weights_TK.shape
        D = y_SD.shape[-1]
        y_RD = _all_to_all_rows(y_SD, meta.input_splits, meta.output_splits, self.shard.group)
        y_TKD = y_RD.index_select(0, meta.plan.inverse_R()).view(T, K, D)
        # The weighted sum as one batched GEMM, like the grouped_mm backend's combine: deterministic, no atomics.
        weights_T1K = meta.topk_weights_TK.to(y_TKD.dtype).unsqueeze(1)
        return torch.bmm(weights_T1K, y_TKD).squeeze(1)


def _resolve_group(mesh_or_group: DeviceMesh | dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert_parallel needs torch.distributed initialised (dist.init_process_group or torchrun)")
    if mesh_or_group is None:
        return dist.group.WORLD
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(f"expert_parallel needs a 1-D device mesh (e.g. mesh['ep']), got a {mesh_or_group.ndim}-D "
                             f"mesh with dims {mesh_or_group.mesh_dim_names}")
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise TypeError(f"mesh_or_group must be a 1-D DeviceMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")


def _gather_full_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # state_dict post-hook: replace each local shard [L, ...] by the full [E, ...] tensor (a collective).
    shard: ExpertShard = module.expert_shard
    for name in EXPERT_PARAM_NAMES:
        key = prefix + name
        if key not in state_dict:
            continue
        local = state_dict[key].detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.ep_size)]
        dist.all_gather(parts, local, group=shard.group)
        state_dict[key] = torch.cat(parts, 0)


def _slice_full_experts(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # load_state_dict pre-hook: a full [E, ...] tensor is cut to this rank's [L, ...] rows; a local one is kept.
    shard: ExpertShard = module.expert_shard
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    for name in EXPERT_PARAM_NAMES:
        key = prefix + name
        if key in state_dict and state_dict[key].shape[0] == shard.num_experts:
            state_dict[key] = state_dict[key][lo:hi]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every expert-parallel shard parameter in ``model``: pass them to FSDP2's ``fully_shard(ignored_params=...)``,
    and scale their gradients as ``docs/EXPERT_PARALLEL.md`` describes."""
    return [p for m in model.modules() if getattr(m, "expert_shard", None) is not None
            for n, p in m.named_parameters(recurse=False) if n in EXPERT_PARAM_NAMES]


def expert_parallel(layer: nn.Module, mesh_or_group: DeviceMesh | dist.ProcessGroup | None = None, *,
                    balance_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shards ``layer.experts`` over an expert-parallel group, in place, and installs the all-to-all dispatcher.

    Args:
        layer: a :class:`leanmoe.MoE` whose experts hold all E experts, identical on every rank of the group (same
            seed, or load a full ``state_dict`` afterwards). Parameters may be on the ``meta`` device.
        mesh_or_group: a 1-D :class:`DeviceMesh` (``mesh["ep"]``) or a process group; ``None`` is the whole world.
        balance_group: where the router's load counts are summed before an aux-loss-free bias update; it must span
            every rank that holds a replica of this router (so all make the same selection). Default: the world.

    Effects: each expert parameter ``[E, ...]`` becomes a new ``nn.Parameter`` holding rows ``[p*L, (p+1)*L)``
    (create the optimizer afterwards); ``layer.experts.expert_shard`` records the placement (an
    :class:`ExpertShard`); ``state_dict()`` gathers full ``[E, ...]`` tensors (a collective: call it on every rank)
    and ``load_state_dict`` accepts full tensors (saved with any EP size) or this rank's shard.
    ``layer.dispatcher`` becomes an :class:`ExpertParallelDispatcher`; ``layer.router.balance_group`` is set.

    Raises ``ValueError`` when ``num_experts`` is not divisible by the group size. Returns ``layer``.
    """
    group = _resolve_group(mesh_or_group)
    experts = layer.experts
    if getattr(experts, "expert_shard", None) is not None or isinstance(layer.dispatcher, ExpertParallelDispatcher):
        raise ValueError("expert_parallel was already applied to this layer")
    E = experts.gate_up_proj.shape[0]
    P = dist.get_world_size(group)
    if E % P:
        raise ValueError(f"num_experts must be divisible by the expert-parallel group size, got num_experts={E}, "
                         f"group size={P}")
    shard = ExpertShard(group=group, ep_rank=dist.get_rank(group), ep_size=P, num_experts=E)
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    with torch.no_grad():
        for name in EXPERT_PARAM_NAMES:
            param = getattr(experts, name, None)
            if param is None:
                continue
            setattr(experts, name, nn.Parameter(param[lo:hi].clone(), requires_grad=param.requires_grad))
    experts.expert_shard = shard
    experts.register_state_dict_post_hook(_gather_full_experts)
    experts.register_load_state_dict_pre_hook(_slice_full_experts)
    layer.dispatcher = ExpertParallelDispatcher(shard)
    layer.router.balance_group = dist.group.WORLD if balance_group is None else balance_group
    return layer
