"""Shared by the bench scripts: the best of N timings, and a moto S3 server on loopback."""

import socket
import subprocess
import sys
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


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """A moto S3 server in its own process on a free loopback port, and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"
