"""Run tags this library reads and writes (the sensor's whole state lives in them).

Dagster copies a run's tags to its re-executions (run retries, "re-execute from failure"),
so each tag that describes one run's life (its heartbeat, stall, the sensor's decision, a
continuation request) carries the run it belongs to in its value (``mark``:
``<run id>@<value>``); on a re-execution they are its parent's and ``own`` drops them, one
by one: a re-execution's first heartbeat cannot adopt its parent's stall or decision.
Values written before 0.2 (no run id in them) are owned through ``RUN_ID`` as then.
"""

from collections.abc import Mapping

STAGE_RUN = "longrun/stage_run"
"""``true`` on a run that computed a model stage."""
ASSETS = "longrun/assets"
"""The stage assets a run computed, comma-separated (for relaunching it)."""
HEARTBEAT = "longrun/heartbeat"
"""``longrun/heartbeat/<asset>``: one ``recovery.Beat`` per stage step (parallel steps of
one run are judged apart): the time of the last progress, batches done of the total, the
process doing the work (host, pid, boot id, pid namespace, start ticks), the step's state
(working, ``ended``, ``preempted``, ``failed``, ``error``) and the claim generation it holds.
0.2 wrote one ``longrun/heartbeat`` for the whole run; it still reads, as a step of its own."""
HEARTBEAT_ENDED = "ended"
PROGRESS = "longrun/progress"
"""For people, in the UI's runs list: the stage, its partition and how far it is, e.g.
``embeddings[2026-11-01]: 45% 1,234/2,740 rows, ETA 3m`` (written with each heartbeat;
never read by the library)."""
STALLED = "longrun/stalled"
"""Time the run's watchdog found it stalled (then it exited the process)."""
CONTINUATION = "longrun/continuation"
"""``requested``: the run's time budget ended a segment; the partition continues."""
ATTEMPT = "longrun/attempt"
SEGMENT = "longrun/segment"
RELAUNCHED_FROM = "longrun/relaunched_from"
HANDLED = "longrun/stall_handled"
"""``relaunch`` once the sensor asked for a run to replace this one (for people: the
sensor decides from the runs and their materializations every tick, not from this)."""
DECIDED_AT = "longrun/decided_at"
"""0.2's decision time (still owned, so a re-execution does not inherit it)."""
SELECTION = "longrun/selection"
"""The assets a relaunch selects, comma-separated: everything the stalled run planned to
materialize (a schedule's run has no asset selection; its downstream assets count too)."""
SUPERSEDED = "longrun/superseded"
"""Why the run's watchdog ended its process: the run was no longer live, or another attempt
claimed its partition."""
ENDING = "longrun/ending"
"""Why the sensor ended the run (written before its terminate)."""
GAVE_UP = "longrun/gave_up"
"""Why the sensor does not relaunch the run's partitions (its code raised, a person
canceled it, or the retry budget is spent)."""
RUN_ID = "longrun/run_id"
"""The run the life tags below were written for."""
LIFE = (HEARTBEAT, STALLED, CONTINUATION, HANDLED, DECIDED_AT, SELECTION, SUPERSEDED, ENDING,
        GAVE_UP, RUN_ID)
WILL_RETRY = "dagster/will_retry"
"""Set by Dagster on a failed run: whether its run retries will re-execute it."""
MAX_RETRIES = "dagster/max_retries"
"""Dagster's per-run retry limit: the sensor sets 0 on a run it relaunches itself, so a
failure the run's worker reports late cannot start a re-execution beside the relaunch."""
AUTO_RETRY_RUN_ID = "dagster/auto_retry_run_id"
"""Set by Dagster on a failed run once its run retries launched the re-execution."""


OWNER_SEP = "@"


def mark(run_id: str, value: str) -> str:
    """A life tag's value, owned by ``run_id``."""
    return f"{run_id}{OWNER_SEP}{value}"


def own(tags: Mapping[str, str], run_id: str, parent_run_id: str | None) -> Mapping[str, str]:
    """``tags`` with the life tags of this run only (their values without the owner); the
    ones a re-execution inherited from its parent run are dropped."""
    legacy_owner = tags.get(RUN_ID) or (None if parent_run_id else run_id)
    out = {k: v for k, v in tags.items() if not _life(k) or k == RUN_ID}
    for key, raw in tags.items():
        if not _life(key) or key == RUN_ID or not isinstance(raw, str):
            continue
        owner, sep, value = raw.partition(OWNER_SEP)
        if sep and "|" not in owner:
            if owner == run_id:
                out[key] = value
        elif legacy_owner == run_id:
            out[key] = raw
    return out


def heartbeat_key(asset: str) -> str:
    """The tag holding the beat of the stage step of ``asset`` ("a/b")."""
    return f"{HEARTBEAT}/{asset}"


def beats(owned: Mapping[str, str]) -> dict[str, str]:
    """The raw beat of each stage step in a run's own tags, by asset ("" for 0.2's one)."""
    prefix = HEARTBEAT + "/"
    return {k[len(prefix):] if k != HEARTBEAT else "": v for k, v in owned.items()
            if k == HEARTBEAT or k.startswith(prefix)}


def last_beat(owned: Mapping[str, str]) -> str | None:
    """The raw beat of the step that beat last (for people and tests; the sensor judges
    each step by its own)."""
    raws = list(beats(owned).values())

    def at(raw: str) -> float:
        try:
            value = float(raw.split("|", 1)[0])
        except ValueError:
            return float("-inf")
        return value if abs(value) < 1e12 else float("-inf")  # nan and inf too

    return max(raws, key=at) if raws else None


def _life(key: str) -> bool:
    return key in LIFE or key.startswith(HEARTBEAT + "/")
