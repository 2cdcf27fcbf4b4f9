"""Train a small MoE language model with expert parallelism for a few steps and print the loss.

    torchrun --nproc-per-node 2 examples/expert_parallel.py            # gloo on CPUs, or NCCL if GPUs are there
    torchrun --nproc-per-node 2 examples/expert_parallel.py --fsdp     # FSDP2 for everything but the experts

Each rank holds E / world experts of every MoE layer and its own batch of tokens. The task is synthetic: the next
token is a fixed function of the current one, so the loss falls quickly. Gradients are those of the mean of the
ranks' losses:
- replicated parameters (embedding, router, shared experts, head) are averaged over ranks (by hand, or by FSDP2);
- expert-shard gradients already sum every rank's tokens (the all-to-all backward brings them home), so they are
  divided by the world size, never all-reduced.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

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
    dist.init_process_group("nccl" if use_cuda else "gloo")
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
        from torch.distributed.fsdp import fully_shard
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
        print(f"world {world}, {args.experts // world} experts per rank; full state_dict shapes: {shapes}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
