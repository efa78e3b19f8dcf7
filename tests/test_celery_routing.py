"""GPU admission under Celery, as a plan: steps of a Dagster pool get the queue of
longrun_dagster.celery's mapping (dagster-celery reads only the queue tag). No broker
here; tests/test_celery.py runs it on real workers."""

import importlib
import types
from typing import Any

import dagster as dg
import pytest
from dagster._core.execution.api import create_execution_plan

pytest.importorskip("dagster_celery")
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG  # noqa: E402

from longrun_dagster.celery import on_celery, route_pools  # noqa: E402


@pytest.fixture(autouse=True)
def broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning a job resolves its executor config, so it needs the broker variables."""
    monkeypatch.setenv("DAGSTER_CELERY_BROKER", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND", "redis://127.0.0.1:1/1")


def queues(job: dg.JobDefinition, pool_queues: dict[str, str], **kwargs: Any
           ) -> dict[str, str | None]:
    plan = route_pools(create_execution_plan(job, **kwargs), pool_queues)
    return {s.key: (s.tags or {}).get(DAGSTER_CELERY_QUEUE_TAG)
            for s in plan.get_all_steps_in_topo_order()}


def test_the_example_on_celery_sends_its_model_stages_to_the_gpu_queue() -> None:
    module = importlib.import_module("deploy.celery.definitions")
    found = [name for name, value in vars(module).items() if isinstance(value, dg.Definitions)]
    assert found == ["defs"]  # Dagster refuses a module with two
    job = module.defs.resolve_job_def("annotation")
    assert job.executor_def.name == "celery"
    assert queues(job, {"gpu": "gpu"}, tags={"dagster/partition": "2026-11-02"}) == {
        "records": None, "normalized": None, "extracted": None, "embeddings": "gpu",
        "quality": "gpu", "daily_summary": None}  # extracted calls an API: no GPU queue


def test_a_step_that_names_its_queue_keeps_it() -> None:
    @dg.asset(pool="gpu", op_tags={DAGSTER_CELERY_QUEUE_TAG: "a100"})
    def big() -> None: ...

    @dg.asset(pool="gpu")
    def small() -> None: ...

    @dg.asset(pool="disk")
    def copy() -> None: ...

    defs = on_celery(dg.Definitions(assets=[big, small, copy]))
    job = defs.resolve_implicit_global_asset_job_def()
    assert queues(job, {"gpu": "gpu0"}) == {"big": "a100", "small": "gpu0", "copy": None}


def test_a_revoked_step_whose_worker_never_answers_is_given_up_after_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """dagster-celery waits for every revoked task to report; one on a dead or frozen worker
    never does (its run worker polled forever). tests/test_celery.py kills real workers.
    On a clock of the test's own: with the wall clock, a revoke slower than the grace under
    a loaded CI machine read as given up at once (seen beside two other CI runs)."""
    from celery import Celery
    from celery.exceptions import TaskRevokedError

    from longrun_dagster import celery as module
    from longrun_dagster.celery import RevocableResult

    now = [1000.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    app = Celery(broker="memory://", backend="cache+memory://")
    lost = RevocableResult(app.AsyncResult("lost"), grace=0.2)
    assert not lost.ready()
    lost.revoke()
    now[0] += 0.19
    assert not lost.ready()  # within the grace it may still report
    now[0] += 0.02
    assert lost.ready()
    with pytest.raises(TaskRevokedError, match="not heard from within 0.2s"):
        lost.get()

    app.backend.store_result("done", ["event"], "SUCCESS")
    done = RevocableResult(app.AsyncResult("done"), grace=60)
    done.revoke()  # it reported: its events are read, not dropped
    assert done.ready() and done.get() == ["event"]
