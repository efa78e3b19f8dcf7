"""A fix to Dagster, applied when a stage module is imported (``apply`` is idempotent).

Pool slots (``pool="gpu"``). Dagster's ``SqlEventLogStorage._claim_concurrency_slot``
(1.13) reads a free slot with ``SELECT ... FOR UPDATE SKIP LOCKED`` and then updates it,
on an autocommit connection: the row lock ends with the SELECT, so two steps that claim
within the same milliseconds can both read the one free slot and both be told CLAIMED:
two stages on one GPU. Seen in CI on PostgreSQL, and reproduced by
``tests/test_gpu_pool.py::test_simultaneous_claims_of_one_slot_admit_one``. The fix makes
the update a compare-and-set: it takes the slot only while it is still free, so a claim
that lost the race is BLOCKED and waits, as Dagster's own loop already handles. The
method is replaced only while its source still has the unguarded update (a later Dagster
that fixes it keeps its own).
"""

import inspect
from typing import Any

_APPLIED = "_longrun_compare_and_set"


def apply() -> None:
    from dagster._core.storage.event_log import sql_event_log

    storage = sql_event_log.SqlEventLogStorage
    if getattr(storage._claim_concurrency_slot, _APPLIED, False):
        return
    try:
        source = inspect.getsource(storage._claim_concurrency_slot)
    except (OSError, TypeError):  # no source shipped: leave Dagster's as it is
        return
    if ".with_for_update(skip_locked=True)" not in source or "step_key == None" in (
            source.split(".update()", 1)[-1]):
        return
    storage._claim_concurrency_slot = _claim_concurrency_slot  # type: ignore[method-assign]


def _claim_concurrency_slot(self: Any, concurrency_key: str, run_id: str,
                            step_key: str) -> Any:
    """Dagster's claim, with the update guarded by ``step_key IS NULL``."""
    import sqlalchemy as db
    from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
    from dagster._core.storage.sqlalchemy_compat import db_select
    from dagster._utils.concurrency import ConcurrencySlotStatus

    slots = ConcurrencySlotsTable
    with self.index_connection() as conn:
        row = conn.execute(
            db_select([slots.c.id]).select_from(slots)
            .where(db.and_(slots.c.concurrency_key == concurrency_key,
                           slots.c.step_key == None,  # noqa: E711 - SQL IS NULL
                           slots.c.deleted == False))  # noqa: E712
            .with_for_update(skip_locked=True).limit(1)).fetchone()
        if not row or not row[0]:
            return ConcurrencySlotStatus.BLOCKED
        taken = conn.execute(
            slots.update().values(run_id=run_id, step_key=step_key)
            .where(db.and_(slots.c.id == row[0],
                           slots.c.step_key == None))).rowcount  # noqa: E711
        return ConcurrencySlotStatus.CLAIMED if taken else ConcurrencySlotStatus.BLOCKED


setattr(_claim_concurrency_slot, _APPLIED, True)
