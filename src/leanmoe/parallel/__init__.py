"""Token dispatch: the local dispatcher, and expert parallelism over ``torch.distributed``."""

from leanmoe.parallel.dispatcher import DispatchMeta, LocalDispatcher

__all__ = ["DispatchMeta", "LocalDispatcher"]
