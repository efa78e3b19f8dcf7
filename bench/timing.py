"""Shared by the bench scripts: the best of N wall-clock timings."""

import time
from collections.abc import Callable
from typing import Any


def best(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Seconds of the fastest of ``repeat`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
