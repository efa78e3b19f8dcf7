"""Run tags this library reads and writes (the sensor's whole state lives in them).

Dagster copies a run's tags to its re-executions (run retries, "re-execute from failure"),
so the tags that describe one run's life (its heartbeat, stall, the sensor's decision,
a continuation request) are written together with ``RUN_ID``, the run they belong to; on
a re-execution they are its parent's and ``own`` drops them.
"""

from collections.abc import Mapping

STAGE_RUN = "longrun/stage_run"
"""``true`` on a run that computed a model stage."""
ASSETS = "longrun/assets"
"""The stage assets a run computed, comma-separated (for relaunching it)."""
HEARTBEAT = "longrun/heartbeat"
"""``<time of last progress>|<batches done>/<total>|<pid>|<host>``, then ``|ended`` once the
stage step is over (its process may exit while the run goes on with other steps)."""
HEARTBEAT_ENDED = "ended"
STALLED = "longrun/stalled"
"""Time the run's watchdog found it stalled (then it exited the process)."""
CONTINUATION = "longrun/continuation"
"""``requested``: the run's time budget ended a segment; the partition continues."""
ATTEMPT = "longrun/attempt"
SEGMENT = "longrun/segment"
RELAUNCHED_FROM = "longrun/relaunched_from"
HANDLED = "longrun/stall_handled"
"""What the sensor decided for the run: relaunch, continue, give_up, leave, dagster_retry
(Dagster's run retries re-execute it instead)."""
RUN_ID = "longrun/run_id"
"""The run the life tags below were written for."""
LIFE = (HEARTBEAT, STALLED, CONTINUATION, HANDLED, RUN_ID)
WILL_RETRY = "dagster/will_retry"
"""Set by Dagster on a failed run when its run retries will re-execute it."""


def own(tags: Mapping[str, str], run_id: str, parent_run_id: str | None) -> Mapping[str, str]:
    """``tags`` without the life tags a re-execution inherited from its parent run."""
    owner = tags.get(RUN_ID) or (None if parent_run_id else run_id)
    if owner == run_id:
        return tags
    return {k: v for k, v in tags.items() if k not in LIFE}
