"""The example code location (``dagster dev -w workspace.yaml``; headless: ``./scripts/run``).

Nothing a run uses is read from the environment when this module is imported: it is
resolved in the process that executes the run, on whichever host that is.

- ``LONGRUN_BASE_URI``: ``file:///...`` or ``s3://bucket/prefix`` (default: under
  ``$DAGSTER_HOME``), read by the IO manager when the run starts; for S3, boto3's own
  ``AWS_ENDPOINT_URL_S3`` (MinIO, a test endpoint) and ``AWS_*`` credentials.
- GPU guard thresholds and other resource settings: run config (the launchpad's
  ``resources: gpu: config: soft_threshold: 0.8``), defaults 0.85 / 0.95.
- ``LONGRUN_LLM_BASE_URL`` and ``OPENAI_API_KEY``: the OpenAI-compatible endpoint the
  ``extracted`` stage calls (vLLM, a hosted engine); unset, the step's process starts
  longrun's deterministic test server and calls that. ``LONGRUN_LLM_MODEL`` names the
  model (default ``longrun-tiny``, the test server's); the one setting read where the code
  location loads, since the model is part of the stage's definition (its fingerprint).
- ``LONGRUN_STALL_TIMEOUT``: seconds without progress before a run counts as stalled (900);
  a setting of the sensor, which runs in this code location, so it is read here.
"""

import os
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from definitions.assets import (
    DAYS,
    daily_summary,
    embeddings,
    extracted,
    normalized,
    records,
)
from longrun_dagster import (
    ApiEndpoint,
    AtomicObjectStoreIOManager,
    GpuGuard,
    Heartbeat,
    stalled_run_sensor,
)

STALL_TIMEOUT = float(os.environ.get("LONGRUN_STALL_TIMEOUT", "900"))

annotation_job = dg.define_asset_job("annotation",
                                     selection=dg.AssetSelection.groups("annotation"))

defs = dg.Definitions.merge(dg.Definitions(
    assets=[records, normalized, extracted, embeddings, daily_summary],
    jobs=[annotation_job],
    schedules=[dg.build_schedule_from_partitioned_job(annotation_job, hour_of_day=1)],
    sensors=[stalled_run_sensor(stall_timeout_seconds=STALL_TIMEOUT, retry_budget=3)],
    # a process per step, as by default, but forked from one that imported this module
    # (torch, pandas, the stages) once per run: a step of a reused stage starts in well
    # under a second instead of re-importing everything
    executor=dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {"preload_modules": ["definitions"]}}}),
    resources={
        # base_uri unset: $LONGRUN_BASE_URI where the run executes; the S3 client is made
        # only for an s3:// URI
        "io_manager": AtomicObjectStoreIOManager(s3=S3Resource()),
        "gpu": GpuGuard(),
        "heartbeat": Heartbeat(stall_timeout_seconds=STALL_TIMEOUT),
        # LONGRUN_LLM_BASE_URL (and the key in OPENAI_API_KEY) where the run executes;
        # unset, the embedded test server
        "llm": ApiEndpoint(embedded_fallback=True),
    },
    # the stages declared by configuration: definitions/stages/*/defs.yaml (the quality
    # stage); where that folder is comes from [tool.dg.project] in pyproject.toml
), dg.load_from_defs_folder(path_within_project=Path(__file__).parent))

__all__ = ["DAYS", "defs"]
