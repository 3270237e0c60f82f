"""Settings of the test process (the toy fixtures are in the repository's conftest.py)."""

from __future__ import annotations

import gc

import torch


def pytest_configure(config):
    # The toy's tensors are small: a second intra-op thread gains little on an idle CPU and, on a
    # busy one (or beside another xdist worker), makes every op wait for a thread that is not
    # running, several times slower.
    torch.set_num_threads(1)
    # After collection the session holds some 500,000 objects that live to its end (torch,
    # transformers, the test modules), and each of CPython's full collections walks all of them:
    # about 0.3 s, twenty-odd times in the smoke suite, a quarter of its run. Young collections
    # every 10,000 allocations instead of 700, and that heap frozen, leave it what the tests allocate.
    gc.set_threshold(10_000, 10, 10)


def pytest_collection_finish(session):
    gc.freeze()
