"""Per-step overheads of a model stage: checkpoints, heartbeats, the VRAM guard.

    python bench/overheads.py [--batches 200] [--step-ms 10] [--pipeline-steps 10 50]
                              [--ablate] [--stage]

Runs the stage's batch loop (no Dagster) over ``--batches`` batches of 256 rows whose
output is a 384-float embedding per row, each batch taking ``--step-ms`` of simulated GPU
time (a sleep: it releases the GIL, as a CUDA call does), with checkpoints every 1, 10 and
50 batches and never; prints the wall time, the cost per checkpoint and its fraction of
the run. Then, for each of ``--pipeline-steps``, model time / wall (model time: batches x
step) of the bare model function in a loop, of the sequential batch loop
(``pipelined=False``) and of the pipelined one, checkpointing every 10 batches; each the
best of ``--repeat`` runs, interleaved so that other load hits all three alike. Then the
cost per call of ``Watchdog.progress`` (heartbeat) and ``VramGuard.step`` (host backend).

``--ablate`` adds a what-if table at the first of ``--pipeline-steps``: the pipelined loop
with pandera validation or the loop's snapshot of fn's output swapped for no-ops (patched
in this process only; the output is then not what the product guarantees). It says how
far the loop could get with either made free, and so where the ceiling is on this machine.

``--stage`` measures as a user meets it: the same workload as a ``model_stage`` through
``dg.materialize`` (its upstream already committed), wall from the first model call to
the asset check's verdict, shipped and with the snapshot or the commit's ledger check made
free (the code before issue 23 had neither), interleaved, best of ``--repeat``.
"""

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from common import best

import longrun_dagster.batches as batches_module
from longrun_dagster.batches import BatchLoop, Cadence
from longrun_dagster.checkpoint import Checkpointer
from longrun_dagster.gpu import Thresholds, VramGuard, choose_backend
from longrun_dagster.heartbeat import Watchdog
from longrun_dagster.storage import LocalStore
from longrun_dagster.validation import Report, empty_quarantine, no_cases

SCHEMA = pa.DataFrameSchema({"id": pa.Column(str), "embedding": pa.Column(object)})


def embedder(step_s: float) -> Callable[[pd.DataFrame, int], pd.DataFrame]:
    def model(batch: pd.DataFrame, index: int) -> pd.DataFrame:
        time.sleep(step_s)
        vectors = np.random.default_rng(index).random((len(batch), 384), dtype=np.float32)
        return pd.DataFrame({"id": batch.id.to_numpy(), "embedding": list(vectors)})

    return model


def run_loop(frame: pd.DataFrame, every: int, step_s: float,
             pipelined: bool = True) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(LocalStore(tmp), "a/p=x/_checkpoints/f", background=True)
        loop = BatchLoop(embedder(step_s), frame, batch_size=256, schema=SCHEMA,
                         checkpointer=ckpt, pipelined=pipelined,
                         cadence=Cadence(every_batches=every, every_seconds=1e9,
                                         progress_every_seconds=1e9))
        start = time.perf_counter()
        loop.run()
        return time.perf_counter() - start, ckpt.saves


def run_bare(frame: pd.DataFrame, step_s: float) -> float:
    """The model function alone over the same batches: the ceiling for any loop."""
    model = embedder(step_s)
    start = time.perf_counter()
    for index in range(-(-len(frame) // 256)):
        model(frame.iloc[index * 256:(index + 1) * 256], index)
    return time.perf_counter() - start


def pipeline_table(frame: pd.DataFrame, steps_ms: list[float], repeat: int) -> None:
    batches = -(-len(frame) // 256)
    print(f"model time / wall, {batches} batches, checkpoint every 10, best of {repeat}:")
    print("(and, for the pipelined loop's best run, process CPU ms per batch and the cores "
          "it got: CPU / wall)")
    print(f"{'step ms':>7} {'bare loop':>10} {'sequential':>11} {'pipelined':>10} "
          f"{'CPU ms/batch':>13} {'cores':>6}")
    for step_ms in steps_ms:
        step = step_ms / 1000
        runs: dict[str, list[tuple[float, float]]] = {"bare": [], "sequential": [],
                                                      "pipelined": []}
        for _ in range(repeat):
            runs["bare"].append(cpu_and_wall(partial(run_bare, frame, step)))
            runs["sequential"].append(cpu_and_wall(partial(run_loop, frame, 10, step, False)))
            runs["pipelined"].append(cpu_and_wall(partial(run_loop, frame, 10, step, True)))
        best_of = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
        ratio = {k: batches * step / wall for k, (_, wall) in best_of.items()}
        cpu, wall = best_of["pipelined"]
        print(f"{step_ms:>7.0f} {ratio['bare']:>10.2f} {ratio['sequential']:>11.2f} "
              f"{ratio['pipelined']:>10.2f} {cpu / batches * 1e3:>13.1f} {cpu / wall:>6.2f}")


def ablation_table(frame: pd.DataFrame, step_ms: float, repeat: int) -> None:
    """The pipelined loop with validation and/or the snapshot made free (no-ops)."""
    batches, step = -(-len(frame) // 256), step_ms / 1000
    validate, snapshot = batches_module.validate, batches_module._snapshot

    def unchecked(out: pd.DataFrame, schema: object, first_row: int = 0) -> Report:
        return Report(out, empty_quarantine(), no_cases())

    def same(frame: pd.DataFrame) -> pd.DataFrame:
        return frame

    variants = {"as shipped": (validate, snapshot), "no snapshot": (validate, same),
                "no validation": (unchecked, snapshot), "neither": (unchecked, same)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ["bare", *variants]}
    try:
        for _ in range(repeat):
            runs["bare"].append(cpu_and_wall(partial(run_bare, frame, step)))
            for name, (batches_module.validate, batches_module._snapshot) in variants.items():
                runs[name].append(cpu_and_wall(partial(run_loop, frame, 10, step, True)))
    finally:
        batches_module.validate, batches_module._snapshot = validate, snapshot
    print(f"what-if, pipelined loop at {step_ms:.0f} ms, best of {repeat} interleaved "
          "(model time / wall, process CPU ms per batch):")
    for name, results in runs.items():
        cpu, wall = min(results, key=lambda r: r[1])
        print(f"  {name:<17} {batches * step / wall:>5.2f} {cpu / batches * 1e3:>6.1f}")


def stage_table(batches: int, step_ms: float, repeat: int) -> None:
    """The workload as a model stage through dg.materialize: first model call to verdict,
    shipped and with the snapshot or the ledger check made free, interleaved."""
    import dagster as dg

    from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
    from longrun_dagster.ledger import Ledger

    step = step_ms / 1000
    calls: list[float] = []
    part = dg.StaticPartitionsDefinition(["p"])

    @dg.asset(partitions_def=part)
    def ids() -> pd.DataFrame:
        return pd.DataFrame({"id": [f"r{i}" for i in range(batches * 256)]})

    @model_stage(upstream=ids, schema=SCHEMA, partitions_def=part, batch_size=256,
                 checkpoint_every_batches=10, checkpoint_every_seconds=1e9)
    def embedded(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        calls.append(time.perf_counter())
        return embedder(step)(batch, stage.batch_index)

    def once(tmp: str, run: int) -> float:
        calls.clear()
        io = AtomicObjectStoreIOManager(base_uri=f"file://{tmp}/lr{run}")
        os.makedirs(f"{tmp}/dagster{run}")
        instance = dg.DagsterInstance.local_temp(tempdir=f"{tmp}/dagster{run}")
        resources = {"io_manager": io}
        assert dg.materialize([ids], partition_key="p", resources=resources,
                              instance=instance).success
        result = dg.materialize([ids, embedded], selection=[embedded], partition_key="p",
                                resources=resources, instance=instance)
        [check] = result.get_asset_check_evaluations()
        verdict = next(e.timestamp for e in instance.all_logs(result.run_id)
                       if e.dagster_event is not None
                       and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION")
        assert check.passed and len(calls) == batches
        return _wall_to_verdict(calls[0], verdict)

    snapshot, verify = batches_module._snapshot, Ledger.verify_commit
    variants: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "as shipped": (snapshot, verify),
        "no snapshot": (lambda f: f, verify),
        "no ledger check": (snapshot, lambda self, **kw: None),
        "neither (pre-#23)": (lambda f: f, lambda self, **kw: None),
    }
    walls: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        run = 0
        try:
            for _ in range(repeat):
                for name, (batches_module._snapshot, patched) in variants.items():
                    Ledger.verify_commit = patched  # type: ignore[method-assign]
                    run += 1
                    walls[name].append(once(tmp, run))
        finally:
            batches_module._snapshot = snapshot
            Ledger.verify_commit = verify  # type: ignore[method-assign]
    model = batches * step
    shipped = min(walls["as shipped"])
    print(f"model_stage through dg.materialize, {batches} batches x {step_ms:.0f} ms, "
          f"first model call to the check's verdict, best of {repeat} interleaved:")
    for name, got in walls.items():
        print(f"  {name:<18} {min(got):>6.2f} s  model/wall {model / min(got):>5.2f}  "
              f"shipped costs {(shipped - min(got)) / shipped:>+6.1%}")


def _wall_to_verdict(first_call_perf: float, verdict_epoch: float) -> float:
    """Seconds from a ``perf_counter`` instant to an epoch timestamp (Dagster's events)."""
    return verdict_epoch - (time.time() - (time.perf_counter() - first_call_perf))


def cpu_and_wall(fn: Callable[[], object]) -> tuple[float, float]:
    """Process CPU seconds (all threads) and wall seconds of ``fn()``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--pipeline-steps", type=float, nargs="*", default=[10.0, 50.0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ablate", action="store_true",
                        help="also run the pipelined loop with validation and/or "
                             "the snapshot made free (what-if)")
    parser.add_argument("--stage", action="store_true",
                        help="also run the workload as a model_stage through "
                             "dg.materialize, with and without the snapshot and the "
                             "ledger check (issue 23)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = args.batches * 256
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(rows)]})
    step = args.step_ms / 1000
    base, _ = run_loop(frame, 10**9, step)
    print(f"{args.batches} batches x 256 rows (384 floats each), {args.step_ms:.0f} ms/step; "
          f"no checkpoint until the end: {base:.2f} s")
    print(f"{'every':>6} {'saves':>6} {'wall s':>8} {'ms/save':>8} {'of wall':>8}")
    for every in (1, 10, 50):
        wall, saves = run_loop(frame, every, step)
        extra = max(wall - base, 0.0)
        print(f"{every:>6} {saves:>6} {wall:>8.2f} {extra / max(saves - 1, 1) * 1e3:>8.1f} "
              f"{extra / wall:>7.1%}")
    pipeline_table(frame, args.pipeline_steps, args.repeat)
    if args.ablate:
        ablation_table(frame, args.pipeline_steps[0], args.repeat)
    if args.stage:
        stage_table(args.batches, args.pipeline_steps[0], args.repeat)
    dog = Watchdog(lambda at, c: None, interval=30, stall_timeout=900, enforce=False)
    per = best(lambda: [dog.progress(batches_done=i) for i in range(10000)]) / 10000
    print(f"heartbeat progress(): {per * 1e6:.2f} us/step ({per / step:.4%} of a step)")
    guard = VramGuard(choose_backend("host"), Thresholds(0.99, 1.0))
    per = best(lambda: [guard.step() for _ in range(1000)]) / 1000
    print(f"VRAM guard step() (host backend, every step): {per * 1e6:.1f} us "
          f"({per / step:.3%} of a step)")


if __name__ == "__main__":
    main()
