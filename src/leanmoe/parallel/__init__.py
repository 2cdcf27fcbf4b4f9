"""Token dispatch: the local dispatcher, and expert parallelism over ``torch.distributed``."""

from leanmoe.parallel.dispatcher import DispatchMeta, LocalDispatcher
from leanmoe.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    ExpertParallelMeta,
    ExpertShard,
    check_ranks_agree,
    expert_parallel,
    expert_parameters,
)

__all__ = [
    "DispatchMeta",
    "ExpertParallelDispatcher",
    "ExpertParallelMeta",
    "ExpertShard",
    "LocalDispatcher",
    "check_ranks_agree",
    "expert_parallel",
    "expert_parameters",
]
