"""longrun-dagster: long-running, multi-model batch pipelines on Dagster that survive
timeouts, leaks, crashes, torn writes and bad model output."""

from longrun_dagster.checkpoint import Checkpointer as Checkpointer
from longrun_dagster.commit import Manifest as Manifest
from longrun_dagster.commit import PartitionStore as PartitionStore
from longrun_dagster.errors import CommitConflict as CommitConflict
from longrun_dagster.errors import ConfigError as ConfigError
from longrun_dagster.errors import CorruptObject as CorruptObject
from longrun_dagster.errors import GpuMemoryExceeded as GpuMemoryExceeded
from longrun_dagster.errors import LongrunError as LongrunError
from longrun_dagster.errors import PartitionNotCommitted as PartitionNotCommitted
from longrun_dagster.errors import Preempted as Preempted
from longrun_dagster.errors import SegmentEnded as SegmentEnded
from longrun_dagster.errors import StorageError as StorageError
from longrun_dagster.errors import UnsupportedOutput as UnsupportedOutput
from longrun_dagster.errors import ValidationFailed as ValidationFailed
from longrun_dagster.io_manager import AtomicObjectStoreIOManager as AtomicObjectStoreIOManager
from longrun_dagster.resources import GpuGuard as GpuGuard
from longrun_dagster.stage import StageContext as StageContext
from longrun_dagster.stage import model_stage as model_stage
from longrun_dagster.storage import open_store as open_store

__version__ = "0.1.0"

__all__ = [
    "AtomicObjectStoreIOManager",
    "Checkpointer",
    "CommitConflict",
    "ConfigError",
    "CorruptObject",
    "GpuGuard",
    "GpuMemoryExceeded",
    "LongrunError",
    "Manifest",
    "PartitionNotCommitted",
    "PartitionStore",
    "Preempted",
    "SegmentEnded",
    "StageContext",
    "StorageError",
    "UnsupportedOutput",
    "ValidationFailed",
    "model_stage",
    "open_store",
]
