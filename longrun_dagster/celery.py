"""GPU admission under Celery: steps of a Dagster concurrency pool go to a Celery queue.

dagster-celery picks a step's queue from its ``dagster-celery/queue`` op tag alone; a
model stage's ``pool="gpu"`` means nothing to it. ``celery_executor_with_pool_queues`` is
dagster-celery's executor that also sends every step of a pool named in ``pool_queues``
(default ``{"gpu": "gpu"}``) to that queue, unless the step names a queue itself. Serve
the queue with one worker per device, each with one slot (``--concurrency 1``) and no
prefetch (``worker_disable_prefetch``): a device then runs one step at a time, and a busy
worker holds no second step while another device is idle.

A terminated run stops waiting for its steps' tasks ``revoked_step_grace_seconds`` after
revoking them. dagster-celery waits until each revoked task reports, but a task on a worker
that died or froze never does, and its run worker then polled forever (a run stuck
CANCELING, or one the stalled-run sensor marked failed whose process never ended). A task
on a live worker is not stopped by the revoke; its stage ends itself when it sees the run
no longer working (the heartbeat watchdog).

``on_celery(defs)`` returns ``defs`` with this executor as the default of its jobs, the
broker and result backend read from ``DAGSTER_CELERY_BROKER`` / ``DAGSTER_CELERY_BACKEND``
in each process that runs the job (so their URLs never show in the UI).
"""

import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
from celery.exceptions import TaskRevokedError
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.step import ExecutionStep
from dagster_celery.core_execution_loop import core_celery_execution_loop
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

BROKER_ENV = "DAGSTER_CELERY_BROKER"
BACKEND_ENV = "DAGSTER_CELERY_BACKEND"
DEFAULT_POOL_QUEUES = {"gpu": "gpu"}
DEFAULT_REVOKED_STEP_GRACE = 5.0


def route_pools(plan: ExecutionPlan, pool_queues: Mapping[str, str]) -> ExecutionPlan:
    """``plan`` with the queue tag set on every step of a pool in ``pool_queues`` (a step
    that names its queue keeps it)."""
    steps = {handle: _routed(step, pool_queues) for handle, step in plan.step_dict.items()}
    # the plan is a NamedTuple whose by-key index is built in __new__, which _replace skips
    return plan._replace(step_dict=steps,
                         step_dict_by_key={step.key: step for step in steps.values()})


def _routed(step: Any, pool_queues: Mapping[str, str]) -> Any:
    if not isinstance(step, ExecutionStep) or DAGSTER_CELERY_QUEUE_TAG in step.tags:
        return step
    queue = pool_queues.get(step.pool) if step.pool else None
    return step._replace(tags={**step.tags, DAGSTER_CELERY_QUEUE_TAG: queue}) if queue else step


class RevocableResult:
    """A submitted step's Celery ``AsyncResult`` that, once revoked, counts as ready after
    ``grace`` seconds even if no worker ever reports it (its worker died or froze); it then
    reads as revoked."""

    def __init__(self, result: Any, grace: float) -> None:
        self.result, self.grace = result, grace
        self.revoked_at: float | None = None

    def revoke(self) -> None:
        self.revoked_at = time.monotonic()
        self.result.revoke()

    def ready(self) -> bool:
        return bool(self.result.ready()) or self.given_up()

    def given_up(self) -> bool:
        return self.revoked_at is not None and time.monotonic() - self.revoked_at >= self.grace

    def get(self) -> Any:
        if not self.result.ready():
            raise TaskRevokedError(f"task {self.result.id} was revoked and not heard from "
                                   f"within {self.grace:g}s (its worker is gone or frozen)")
        return self.result.get()


class PoolQueueCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, with steps of the pools in ``pool_queues`` routed and
    revoked steps given up on after ``revoked_step_grace`` seconds."""

    def __init__(self, pool_queues: Mapping[str, str],
                 revoked_step_grace: float = DEFAULT_REVOKED_STEP_GRACE, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self.pool_queues = dict(pool_queues)
        self.revoked_step_grace = revoked_step_grace

    def execute(self, plan_context: Any, execution_plan: ExecutionPlan) -> Any:
        routed = route_pools(execution_plan, self.pool_queues)
        grace = self.revoked_step_grace

        def submit(*args: Any) -> RevocableResult:
            return RevocableResult(_submit_task(*args), grace)  # type: ignore[no-untyped-call]

        return core_celery_execution_loop(  # type: ignore[no-untyped-call]
            plan_context, routed, step_execution_fn=submit)


@dg.executor(
    name="celery",
    config_schema={
        **CELERY_CONFIG,
        "pool_queues": dg.Field(
            dg.Map(str, str),  # type: ignore[no-untyped-call]
            is_required=False, default_value=DEFAULT_POOL_QUEUES,
            description="Dagster pool -> Celery queue: steps of the pool go to the queue "
                        "(served by one single-slot worker per device)."),
        "revoked_step_grace_seconds": dg.Field(
            float, is_required=False, default_value=DEFAULT_REVOKED_STEP_GRACE,
            description="A terminated run waits this long for its revoked step tasks to "
                        "report, then ends without them (a task whose worker died or froze "
                        "never reports)."),
    },
    requirements=dg.multiple_process_executor_requirements(),
)
def celery_executor_with_pool_queues(init_context: dg.InitExecutorContext) -> dg.Executor:
    """dagster-celery's ``celery_executor`` that routes steps of Dagster pools to Celery
    queues (config as that executor's, plus ``pool_queues``)."""
    from dagster._core.execution.retries import RetryMode

    config: Mapping[str, Any] = init_context.executor_config
    return PoolQueueCeleryExecutor(
        pool_queues=config["pool_queues"],
        revoked_step_grace=config["revoked_step_grace_seconds"], broker=config.get("broker"),
        backend=config.get("backend"), config_source=config.get("config_source"),
        include=config.get("include"), retries=RetryMode.from_config(config["retries"]))


def on_celery(defs: dg.Definitions, pool_queues: Mapping[str, str] | None = None,
              ) -> dg.Definitions:
    """``defs`` whose jobs (those without an executor of their own) run their steps on
    Celery workers, pool steps on the queues of ``pool_queues``. An executor ``defs``
    already has (the example's forkserver multiprocess executor) is replaced."""
    executor = celery_executor_with_pool_queues.configured(
        {"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV},
         "pool_queues": dict(pool_queues or DEFAULT_POOL_QUEUES)},
        name="celery")
    if defs.executor is None:
        return dg.Definitions.merge(defs, dg.Definitions(executor=executor))
    from dagster._record import replace  # Definitions is a record; merge refuses two executors

    replaced: dg.Definitions = replace(defs, executor=executor)
    return replaced
