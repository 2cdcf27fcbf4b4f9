"""Shared test set-up.

- Without a CUDA GPU, Triton kernels run in its interpreter: ``TRITON_INTERPRET=1`` must be set before triton is
  imported, so it is set here, first.
- Every test is seeded: ``random``, NumPy and torch get ``crc32(test id) + LEANMOE_TEST_SEED`` (default 0) before the
  test runs, so a test draws the same numbers alone, in any order and on any xdist worker; a failing test's report
  names its seed and how to rerun it.
- Uninitialised memory is poisoned: ``torch.empty``/``empty_like``/``new_empty`` of a floating dtype return NaN-filled
  tensors, so a kernel or backend that forgets to write a row fails its comparison instead of passing on stale zeros.
"""

from __future__ import annotations

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: The base seed of the suite; change it to draw other inputs everywhere (``LEANMOE_TEST_SEED=7 ./scripts/test.sh``).
BASE_SEED = int(os.environ.get("LEANMOE_TEST_SEED", "0"))


def test_seed(nodeid: str) -> int:
    """The seed of one test: fixed by its id and the base seed, independent of order and worker."""
    return (zlib.crc32(nodeid.encode()) + BASE_SEED) % 2**31


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def seed_everything(request):
    seed = test_seed(request.node.nodeid)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("leanmoe seed", f"this test was seeded with {test_seed(item.nodeid)} "
                                                f"(LEANMOE_TEST_SEED={BASE_SEED}); rerun it alone with the same "
                                                f"LEANMOE_TEST_SEED to draw the same inputs"))

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling() and t.is_floating_point() and t.numel():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


def _with_default_device(kwargs: dict) -> dict:
    if kwargs.get("device") is None:
        kwargs = {**kwargs, "device": torch.get_default_device()}
    return kwargs


@pytest.fixture(autouse=True)
def poison_empty(request, monkeypatch):
    # torch.compile cannot trace these replacements; compiled tests opt out with @pytest.mark.no_poison (the same
    # code runs poisoned in the eager tests).
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    # Python replacements fall outside `with torch.device(...)`'s interception, so they pass its device on.
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **_with_default_device(k))))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(_new_empty(self, *a, **k)))
    yield
    monkeypatch.undo()
    _forget_dynamo_torch_objects()


def _forget_dynamo_torch_objects() -> None:
    # Dynamo resolves torch's functions by name once per process and caches the objects. Resolved during a poisoned
    # test, that table holds the replacements, and a later compiled test fails on the real torch.empty_like as an
    # unknown builtin; so a table built under the poison is dropped (rebuilding it takes about 2 s).
    import sys

    trace_rules = sys.modules.get("torch._dynamo.trace_rules")
    if trace_rules is not None and trace_rules.get_torch_obj_rule_map.cache_info().currsize:
        trace_rules.clear_lru_cache()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny problems gain nothing from threads, and on a busy 2-core machine
    OpenMP threads waiting on each other make a 1 ms op take 100 ms. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and n_gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
