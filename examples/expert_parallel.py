"""Train a small MoE language model with expert parallelism for a few steps and print the loss.

    torchrun --nproc-per-node 2 examples/expert_parallel.py            # gloo on CPUs, or NCCL if GPUs are there
    torchrun --nproc-per-node 2 examples/expert_parallel.py --fsdp     # FSDP2 for everything but the experts

Each rank holds E / world experts of every MoE layer and its own batch of tokens. The task is synthetic: the next
token is a fixed function of the current one, so the loss falls quickly. Gradients are those of the mean of the
ranks' losses:
- replicated parameters (embedding, router, shared experts, head) are averaged over ranks (by hand, or by FSDP2);
- expert-shard gradients already sum every rank's tokens (the all-to-all backward brings them home), so they are
  divided by the world size, never all-reduced.

Shutdown: a process group lives until its last reference goes, and only then are its threads (gloo: two worker
threads and a socket loop) joined; ``destroy_process_group`` only drops ``torch.distributed``'s own references. The
model's expert shards hold the group, and so does torch itself once FSDP2 has run (torch 2.13). If the threads are
still running when the interpreter finalizes, one that touches the GIL then is ended by CPython with
``pthread_exit``, whose unwinding through a ``noexcept`` C++ frame calls ``std::terminate``: "terminate called
without an active exception", SIGABRT, now and then on a loaded machine. So every rank finishes its collectives
(a barrier), the model is released and collected, the group destroyed; if gloo threads are still running after
that, the process leaves with ``os._exit(0)`` once everything is written, never finalizing with them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import leanmoe
from leanmoe.parallel.expert_parallel import expert_parallel, expert_parameters


class Block(nn.Module):
    def __init__(self, cfg: leanmoe.MoEConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.dim)
        self.moe = leanmoe.MoE(cfg)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int, cfg: leanmoe.MoEConfig, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.head = nn.Linear(cfg.dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def aux_loss(self):
        return sum(block.moe.aux_loss for block in self.blocks)


def gloo_threads() -> int:
    """Threads of gloo process groups still running in this process (``pt_gloo_runloop``, ``gloo_tcp_loop``; read
    from ``/proc``, so 0 where there is none)."""
    try:
        names = [Path(f"/proc/self/task/{tid}/comm").read_text() for tid in os.listdir("/proc/self/task")]
    except OSError:
        return 0
    return sum(name.startswith(("pt_gloo", "gloo")) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the world for all but the experts")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--backend", default="auto", help="experts backend (see leanmoe.available_backends())")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # A bounded process-group timeout: a rank that stops taking part makes the others fail within it, not hang.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    try:
        train(args, use_cuda)
        # Every rank has finished every collective before any rank starts to tear down.
        dist.barrier()
    finally:
        # train()'s model, shards, mesh and FSDP2 state are garbage now (some in reference cycles): collect them, so
        # that destroy_process_group drops the last reference and the process group joins its threads here.
        gc.collect()
        dist.destroy_process_group()
    left = gloo_threads()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"shutdown: {left} gloo threads left after destroy_process_group", flush=True)
    if left:
        # torch still references the process group (FSDP2 does, in torch 2.13), so its threads would run on into
        # interpreter finalization (see the module docstring). Everything is done and flushed: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train(args, use_cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if use_cuda else "cpu")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))

    vocab = 64
    cfg = leanmoe.MoEConfig(dim=64, hidden_dim=64, num_experts=args.experts, top_k=2, num_shared_experts=1,
                            score_func="sigmoid", balance_bias=True, aux_loss_coef=1e-3,
                            backend=args.backend)
    torch.manual_seed(0)  # the same full model on every rank before sharding
    model = TinyMoELM(vocab, cfg, num_layers=2).to(device)
    for block in model.blocks:
        expert_parallel(block.moe, mesh["ep"])
    experts = expert_parameters(model)
    if args.fsdp:
        fully_shard(model, mesh=mesh, ignored_params=set(experts))
    expert_ids = {id(p) for p in experts}
    replicated = [p for p in model.parameters() if id(p) not in expert_ids]
    # Made after sharding (the expert parameters are new). Two groups: with --fsdp the replicated parameters are
    # DTensors and the expert shards plain tensors, and one fused (foreach) update cannot mix the two.
    opt = torch.optim.AdamW([{"params": replicated}, {"params": experts}], lr=3e-3)

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    next_token = (torch.arange(vocab) * 7 + 3) % vocab
    for step in range(args.steps):
        tokens = torch.randint(vocab, (8, 16), generator=gen)
        targets = next_token[tokens]
        tokens, targets = tokens.to(device), targets.to(device)
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        (loss + model.aux_loss()).backward()

        if not args.fsdp:
            for p in replicated:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if use_cuda else dist.ReduceOp.SUM)
                if not use_cuda:
                    p.grad.div_(world)  # gloo has no AVG
        for p in experts:
            p.grad.div_(world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        leanmoe.update_balance_biases(model)  # load summed over the world: every rank moves its bias alike

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}", flush=True)

    state = model.state_dict()  # expert tensors gathered to full [E, ...]: a collective on every rank
    if rank == 0:
        shapes = {k: tuple(v.shape) for k, v in state.items() if k.endswith("experts.gate_up_proj")}
        print(f"world {world}, {args.experts // world} experts per rank; full state_dict shapes: {shapes}", flush=True)


if __name__ == "__main__":
    main()
