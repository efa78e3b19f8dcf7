"""Progress heartbeats and the in-process watchdog; no Dagster here.

The stage loop calls ``progress()`` after every batch. A background thread publishes the
*time of the last progress* (not the time it runs), so a live thread in a stuck process
still reads as stalled; and when nothing progressed for ``stall_timeout`` seconds it dumps
every thread's stack, reports the stall, and exits the process hard, so a hung CUDA call
does not hold a GPU forever. It also exits when its ``check`` says the work is no longer
this process's (its run ended, another attempt claimed the partition): on another host that
is the only kill that reaches it, and a frozen node that wakes up ends itself.
"""

import functools
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from longrun_dagster.recovery import ProcessIdentity

EXIT_STALLED = 70  # EX_SOFTWARE: the process ended itself because it stopped progressing
EXIT_SUPERSEDED = 75  # EX_TEMPFAIL: its run ended or its claim was superseded elsewhere


def _read(path: str, readlink: bool = False) -> str:
    try:
        if readlink:
            return os.readlink(path)
        with open(path) as text:
            return text.read().strip()
    except OSError:
        return ""  # not Linux: an identity that never matches, so nothing is signalled


@functools.cache
def kernel() -> tuple[str, str]:
    return _read("/proc/sys/kernel/random/boot_id"), _read("/proc/self/ns/pid", readlink=True)


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    as ``t<ticks>``: no wall-clock step moves it (psutil's ``create_time`` moves with
    ``btime``). "" where there is no ``/proc`` (then nothing is ever signalled)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return f"t{fields[19]}" if len(fields) > 19 and fields[19].isdigit() else ""


def current_process(pid: int | None = None) -> ProcessIdentity:
    """This process (or ``pid`` in this pid namespace), named for ``recovery.Beat``."""
    pid = os.getpid() if pid is None else pid
    boot, ns = kernel()
    return ProcessIdentity(socket.gethostname(), pid, boot, ns, start_ticks(pid))


def thread_stacks() -> str:
    """Every thread's current stack, as text for the run log."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}) ---\n{stack}")
    return "\n".join(parts)


class Watchdog:
    """Publishes progress every ``interval`` seconds (only when there was some) and exits
    the process after ``stall_timeout`` seconds without progress (if ``enforce``)."""

    def __init__(self, publish: Callable[[float, dict[str, Any]], None], *,
                 interval: float, stall_timeout: float, enforce: bool = True,
                 on_stall: Callable[[str, float], None] | None = None,
                 check: Callable[[], str | None] | None = None,
                 on_superseded: Callable[[str], None] | None = None,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.publish, self.interval, self.stall_timeout = publish, interval, stall_timeout
        self.enforce, self.on_stall, self._exit = enforce, on_stall, exit
        self.check, self.on_superseded = check, on_superseded
        self._checked_at = time.time()
        self.last_progress = time.time()
        self.counters: dict[str, Any] = {}
        self.published = 0
        self.failed_publishes = 0
        self.last_error: Exception | None = None
        self._published_at = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="longrun-watchdog", daemon=True)

    def start(self) -> None:
        self._publish_now()
        self._thread.start()

    def progress(self, **counters: Any) -> None:
        with self._lock:
            self.last_progress = time.time()
            self.counters = counters

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._publish_now()

    def _run(self) -> None:
        tick = max(0.05, min(self.interval, self.stall_timeout / 4))
        while not self._stop.wait(tick):
            now = time.time()
            with self._lock:
                last = self.last_progress
            if last > self._published_at and now - self._published_at >= self.interval:
                self._publish_now()
            if self.enforce and now - last > self.stall_timeout:
                self._stalled(now - last)
                return
            if self.enforce and self.check is not None and \
                    now - self._checked_at >= self.interval:
                self._checked_at = now
                reason = self._ask()
                if reason is not None:
                    self._superseded(reason)
                    return

    def _ask(self) -> str | None:
        assert self.check is not None
        try:
            return self.check()
        except Exception as exc:  # noqa: BLE001 - an unreachable instance or store proves
            self.last_error = exc  # nothing; the stall timeout still applies
            return None

    def publish_now(self) -> None:
        """Publish the last progress now (a failure is counted, not raised)."""
        self._publish_now()

    def _publish_now(self) -> None:
        with self._lock:
            last, counters = self.last_progress, dict(self.counters)
        try:
            self.publish(last, counters)
        except Exception as exc:  # noqa: BLE001 - a busy instance DB must not end the watchdog
            self.failed_publishes += 1
            self.last_error = exc
            return  # retried at the next tick
        self._published_at = last
        self.published += 1

    def _superseded(self, reason: str) -> None:
        try:
            if self.on_superseded is not None:
                self.on_superseded(reason)
        finally:
            self._exit(EXIT_SUPERSEDED)

    def _stalled(self, silent_for: float) -> None:
        try:
            if self.on_stall is not None:
                self.on_stall(thread_stacks(), silent_for)
        finally:
            self._exit(EXIT_STALLED)
