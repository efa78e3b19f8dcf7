"""`dagster-daemon` with a shorter pause between backfill iterations, for tests.

Dagster 1.13's backfill daemon sleeps a hard-coded 30 s between iterations
(`DEFAULT_DAEMON_INTERVAL_SECONDS`; dagster.yaml has no setting for it), so a backfill
waits up to 30 s to start and up to 30 s more to be marked complete. Everything else is
the real daemon: `python -m tests.helpers.daemon run -w workspace.yaml`.
"""

import os
import sys

import dagster._daemon.controller as controller
from dagster._daemon.cli import main

if __name__ == "__main__":
    controller.DEFAULT_DAEMON_INTERVAL_SECONDS = int(  # type: ignore[misc]
        os.environ.get("LONGRUN_BACKFILL_INTERVAL", "2"))
    sys.exit(main())
