"""The one exception tree of longrun-dagster; every error names the thing and the fix.

    LongrunError
    ├── ConfigError                  (ValueError)  bad base URI, bad stage declaration, ...
    ├── StorageError                               a backend failed (I/O error, S3 5xx, ...)
    │   ├── ObjectNotFound           (FileNotFoundError)
    │   │   └── PartitionNotCommitted              no verified manifest for a partition
    │   ├── CommitConflict                         another writer committed first
    │   │   └── LeaseLost                          a newer attempt claimed the partition
    │   ├── CorruptObject                          size or digest differs from the manifest
    │   └── NewerFormat                            written by a newer longrun-dagster
    ├── UnsupportedOutput            (TypeError)   an object no format can store without pickle
    ├── StageOutputError             (TypeError)   a stage's fn returned no DataFrame
    ├── IncompleteCommit                           a commit's rows do not match its ledger
    ├── ValidationFailed                           a stage's output is over its bad-row budget
    │                                              (raised as a dagster.Failure subclass)
    ├── Preempted                                  SIGTERM: checkpointed and stopped
    ├── SegmentEnded                               time budget spent: checkpointed, resumable
    ├── GpuMemoryExceeded                          VRAM over the hard threshold (retryable)
    ├── ApiOutage                                  every request to an API failed for a while
    └── CostLimitReached                           the partition's next requests would pass
                                                   max_cost_usd (answers so far are kept)

A stalled run raises nothing: its watchdog exits the process and the stalled-run sensor
ends and relaunches the run (its failure says why).

Backend exceptions (``OSError``, ``botocore`` errors) are translated at one seam in each
storage backend: ``raise CommitConflict(...) from exc``.
"""

from typing import Any


class LongrunError(Exception):
    """Base of every error this library raises."""


class ConfigError(LongrunError, ValueError):
    """A setting or declaration is wrong; the message says which and how to fix it."""


class StageOutputError(LongrunError, TypeError):
    """A stage's function returned something other than a pandas DataFrame."""


class StorageError(LongrunError):
    """The object store failed to do what was asked."""

    def __init__(self, message: str, *, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object at ``uri``."""

    def __str__(self) -> str:
        return str(self.args[0])


class PartitionNotCommitted(ObjectNotFound):
    """A partition has no committed (manifest-backed) version."""

    def __init__(self, message: str, *, uri: str, asset: str, partition: str | None) -> None:
        super().__init__(message, uri=uri)
        self.asset = asset
        self.partition = partition


class CommitConflict(StorageError):
    """A conditional write lost: another writer changed the object since it was read."""


class CorruptObject(StorageError):
    """An object's bytes do not match the size or SHA-256 its manifest records."""

    def __init__(
        self, message: str, *, uri: str, expected: str | int, actual: str | int
    ) -> None:
        super().__init__(message, uri=uri)
        self.expected = expected
        self.actual = actual


class UnsupportedOutput(LongrunError, TypeError):
    """An output type that cannot be stored without pickle."""


class IncompleteCommit(LongrunError):
    """A partition's output does not hold every batch of its ledger exactly once, or holds
    other rows than the ledger says: nothing was committed."""

    def __init__(self, message: str, *, missing_batches: list[int]) -> None:
        super().__init__(message)
        self.missing_batches = missing_batches


class ValidationFailed(LongrunError):
    """A stage output failed its schema on more rows than its bad-row budget allows."""

    def __init__(
        self,
        message: str,
        *,
        asset: str,
        partition: str | None,
        rows_checked: int,
        rows_invalid: int,
        failure_cases: list[dict[str, Any]],
    ) -> None:
        super().__init__(message)
        self.asset = asset
        self.partition = partition
        self.rows_checked = rows_checked
        self.rows_invalid = rows_invalid
        self.failure_cases = failure_cases


class Preempted(LongrunError):
    """SIGTERM (eviction, spot notice, shutdown) arrived; completed batches are checkpointed
    and the next attempt resumes after them."""


class SegmentEnded(LongrunError):
    """The run's time budget is nearly spent; the partition is checkpointed, unfinished,
    and its continuation resumes it."""

    def __init__(self, message: str, *, batches_done: int, batches_total: int) -> None:
        super().__init__(message)
        self.batches_done = batches_done
        self.batches_total = batches_total


class LeaseLost(CommitConflict):
    """This attempt's claim on the partition was superseded by a newer attempt, or its
    claim was deleted or damaged while it ran: it must not commit."""


class NewerFormat(StorageError):
    """A manifest or cursor written by a newer longrun-dagster: upgrade, never overwrite."""

    def __init__(self, message: str, *, uri: str, version: int) -> None:
        super().__init__(message, uri=uri)
        self.version = version


class GpuMemoryExceeded(LongrunError):
    """Device memory is over the hard threshold after cleanup; retry in a fresh process."""


class ApiOutage(LongrunError):
    """Every request of an API stage failed for ``outage_seconds``: the attempt ends (its
    answers are kept) and a relaunch resumes it."""


class CostLimitReached(LongrunError):
    """An API stage's partition would pass its ``max_cost_usd`` with its next request: it
    stops before (its answers are kept) and resumes when the limit is raised."""

    def __init__(self, message: str, *, spent_usd: float, limit_usd: float) -> None:
        super().__init__(message)
        self.spent_usd = spent_usd
        self.limit_usd = limit_usd
