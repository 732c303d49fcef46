"""MIM tests run single-threaded: their tensors are tiny, and on a shared 2-core machine OpenMP's barrier waits
between threads cost more than the work (a 64-px ConvNeXt-atto forward: ~0.5 s with 2 busy threads, ~20 ms
with 1). The previous thread count is restored after each test."""

from __future__ import annotations

import pytest

from tests.conftest import one_thread


_single_thread = pytest.fixture(autouse=True)(one_thread)
