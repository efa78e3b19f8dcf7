"""longrun-dagster: long-running, multi-model batch pipelines on Dagster that survive
timeouts, leaks, crashes, torn writes and bad model output.

Names are imported on first use, so ``import longrun_dagster.gpu`` (or the storage layer)
does not pull in Dagster.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

_EXPORTS = {
    "Answer": "longrun_dagster.api.answer",
    "ApiEndpoint": "longrun_dagster.api.stage",
    "ApiOutage": "longrun_dagster.errors",
    "ApiStageComponent": "longrun_dagster.components",
    "BadAnswer": "longrun_dagster.api.answer",
    "CostLimitReached": "longrun_dagster.errors",
    "api_stage": "longrun_dagster.api.stage",
    "AtomicObjectStoreIOManager": "longrun_dagster.io_manager",
    "Checkpointer": "longrun_dagster.checkpoint",
    "Claimed": "longrun_dagster.attempt",
    "Committed": "longrun_dagster.attempt",
    "CommitConflict": "longrun_dagster.errors",
    "ConfigError": "longrun_dagster.errors",
    "CorruptObject": "longrun_dagster.errors",
    "GpuGuard": "longrun_dagster.resources",
    "GpuMemoryExceeded": "longrun_dagster.errors",
    "Heartbeat": "longrun_dagster.resources",
    "IncompleteCommit": "longrun_dagster.errors",
    "LeaseLost": "longrun_dagster.errors",
    "LongrunError": "longrun_dagster.errors",
    "NewerFormat": "longrun_dagster.errors",
    "Manifest": "longrun_dagster.commit",
    "ModelStageComponent": "longrun_dagster.components",
    "PartitionAttempt": "longrun_dagster.attempt",
    "PartitionNotCommitted": "longrun_dagster.errors",
    "PartitionStore": "longrun_dagster.commit",
    "Preempted": "longrun_dagster.errors",
    "Reused": "longrun_dagster.attempt",
    "SegmentEnded": "longrun_dagster.errors",
    "StageContext": "longrun_dagster.stage",
    "StorageError": "longrun_dagster.errors",
    "UnsupportedOutput": "longrun_dagster.errors",
    "StageOutputError": "longrun_dagster.errors",
    "ValidationFailed": "longrun_dagster.errors",
    "garbage_collection_job": "longrun_dagster.io_manager",
    "model_stage": "longrun_dagster.stage",
    "open_store": "longrun_dagster.storage",
    "stalled_run_sensor": "longrun_dagster.sensors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longrun_dagster' has no attribute {name!r}")


if TYPE_CHECKING:
    from longrun_dagster.api.answer import Answer as Answer
    from longrun_dagster.api.answer import BadAnswer as BadAnswer
    from longrun_dagster.api.stage import ApiEndpoint as ApiEndpoint
    from longrun_dagster.api.stage import api_stage as api_stage
    from longrun_dagster.attempt import Claimed as Claimed
    from longrun_dagster.attempt import Committed as Committed
    from longrun_dagster.attempt import PartitionAttempt as PartitionAttempt
    from longrun_dagster.attempt import Reused as Reused
    from longrun_dagster.checkpoint import Checkpointer as Checkpointer
    from longrun_dagster.commit import Manifest as Manifest
    from longrun_dagster.commit import PartitionStore as PartitionStore
    from longrun_dagster.components import ApiStageComponent as ApiStageComponent
    from longrun_dagster.components import ModelStageComponent as ModelStageComponent
    from longrun_dagster.errors import ApiOutage as ApiOutage
    from longrun_dagster.errors import CommitConflict as CommitConflict
    from longrun_dagster.errors import ConfigError as ConfigError
    from longrun_dagster.errors import CorruptObject as CorruptObject
    from longrun_dagster.errors import CostLimitReached as CostLimitReached
    from longrun_dagster.errors import GpuMemoryExceeded as GpuMemoryExceeded
    from longrun_dagster.errors import IncompleteCommit as IncompleteCommit
    from longrun_dagster.errors import LeaseLost as LeaseLost
    from longrun_dagster.errors import LongrunError as LongrunError
    from longrun_dagster.errors import NewerFormat as NewerFormat
    from longrun_dagster.errors import PartitionNotCommitted as PartitionNotCommitted
    from longrun_dagster.errors import Preempted as Preempted
    from longrun_dagster.errors import SegmentEnded as SegmentEnded
    from longrun_dagster.errors import StageOutputError as StageOutputError
    from longrun_dagster.errors import StorageError as StorageError
    from longrun_dagster.errors import UnsupportedOutput as UnsupportedOutput
    from longrun_dagster.errors import ValidationFailed as ValidationFailed
    from longrun_dagster.io_manager import AtomicObjectStoreIOManager as AtomicObjectStoreIOManager
    from longrun_dagster.io_manager import garbage_collection_job as garbage_collection_job
    from longrun_dagster.resources import GpuGuard as GpuGuard
    from longrun_dagster.resources import Heartbeat as Heartbeat
    from longrun_dagster.sensors import stalled_run_sensor as stalled_run_sensor
    from longrun_dagster.stage import StageContext as StageContext
    from longrun_dagster.stage import model_stage as model_stage
    from longrun_dagster.storage import open_store as open_store
