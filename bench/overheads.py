"""Per-step overheads of a model stage: checkpoints, heartbeats, the VRAM guard.

    python bench/overheads.py [--batches 200] [--step-ms 10] [--pipeline-steps 10 50]
                              [--ablate] [--stage [--only-stage] [--baseline REV]]

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
``dg.materialize`` (its upstream already committed), for each of ``--pipeline-steps``,
comparing ``--baseline`` (a git revision, default HEAD: "old", checked out in a temporary
``git worktree``) with this working tree ("new", uncommitted changes included). Each run is
a fresh process importing ``longrun_dagster`` from its tree (``PYTHONPATH``; the child
asserts where the module came from), old and new alternating ``--repeat`` times. Per run:
wall from the first model call to the asset check's verdict, the model calls' own time,
the tail (last model call's end to the verdict), the bytes put to the store during the
stage's materialization per byte committed, and the size of the commit record
(``_manifest.json``). ``--only-stage`` skips the loop-only tables.
"""

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
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


def stage_child(batches: int, step_ms: float, tree: str) -> None:
    """One measurement, in its own process (``--stage-child``): the workload as a model
    stage through ``dg.materialize``, with ``longrun_dagster`` imported from ``tree``
    (the parent sets ``PYTHONPATH``). Prints one JSON line (see ``_print_stage``)."""
    import dagster as dg

    import longrun_dagster
    from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
    from longrun_dagster.storage.local import LocalStore

    root = Path(tree).resolve()
    loaded = Path(longrun_dagster.__file__).resolve()
    assert loaded.is_relative_to(root), f"longrun_dagster from {loaded}, expected {root}"

    step = step_ms / 1000
    spans: list[tuple[float, float]] = []  # each model call: perf_counter start, end
    written, puts, lock = [0], [0], threading.Lock()
    put = LocalStore.put

    def counting_put(self: LocalStore, key: str, data: bytes | memoryview,
                     *args: Any, **kwargs: Any) -> Any:
        with lock:
            written[0] += memoryview(data).nbytes
            puts[0] += 1
        return put(self, key, data, *args, **kwargs)

    LocalStore.put = counting_put  # type: ignore[method-assign]
    part = dg.StaticPartitionsDefinition(["p"])
    model = embedder(step)

    @dg.asset(partitions_def=part)
    def ids() -> pd.DataFrame:
        return pd.DataFrame({"id": [f"r{i}" for i in range(batches * 256)]})

    @model_stage(upstream=ids, schema=SCHEMA, partitions_def=part, batch_size=256,
                 checkpoint_every_batches=10, checkpoint_every_seconds=1e9)
    def embedded(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
        begin = time.perf_counter()
        out = model(batch, stage.batch_index)
        spans.append((begin, time.perf_counter()))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp, "lr")
        io = AtomicObjectStoreIOManager(base_uri=base.as_uri())
        Path(tmp, "dagster").mkdir()
        instance = dg.DagsterInstance.local_temp(tempdir=str(Path(tmp, "dagster")))
        resources = {"io_manager": io}
        assert dg.materialize([ids], partition_key="p", resources=resources,
                              instance=instance).success
        with lock:
            written[0] = puts[0] = 0
        result = dg.materialize([ids, embedded], selection=[embedded], partition_key="p",
                                resources=resources, instance=instance)
        with lock:
            stage_written, stage_puts = written[0], puts[0]
        [check] = result.get_asset_check_evaluations()
        verdict = next(e.timestamp for e in instance.all_logs(result.run_id)
                       if e.dagster_event is not None
                       and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION")
        assert check.passed and len(spans) == batches, (check.passed, len(spans))
        manifest = AtomicObjectStoreIOManager(
            base_uri=base.as_uri()).partition_store().lookup(["embedded"], "p")
        assert manifest is not None, "no committed partition"
        records = sorted(Path(base, "embedded").glob("**/_manifest.json"))
        assert len(records) == 1, records
        print(json.dumps({
            "tree": str(root), "module": str(loaded), "step_ms": step_ms,
            "batches": batches,
            "wall": _wall_to_verdict(spans[0][0], verdict),
            "model": sum(end - begin for begin, end in spans),
            "tail": _wall_to_verdict(spans[-1][1], verdict),
            "bytes_written": stage_written, "puts": stage_puts,
            "committed_bytes": manifest.size,
            "manifest_bytes": records[0].stat().st_size,
        }), flush=True)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, text=True,
                          capture_output=True).stdout.rstrip("\n")


def _measure(tree: Path, batches: int, step_ms: float) -> dict[str, Any]:
    """``stage_child`` in a fresh interpreter importing ``longrun_dagster`` from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as cwd:  # no '' on sys.path that could shadow it
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--stage-child",
             "--batches", str(batches), "--step-ms", str(step_ms), "--tree", str(tree)],
            env=env, cwd=cwd, text=True, capture_output=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"stage child for {tree} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    print(f"  {lines[-1]}", flush=True)
    return json.loads(lines[-1])


def stage_table(batches: int, steps_ms: list[float], repeat: int, baseline: str) -> None:
    """The workload as a model stage through dg.materialize, ``baseline`` ("old", a git
    worktree) against the current tree ("new"), each run in a fresh process, interleaved
    old, new, old, new... ``repeat`` times per step size."""
    repo = Path(__file__).resolve().parent.parent
    sha = _git(repo, "rev-parse", "--verify", f"{baseline}^{{commit}}")
    print(f"old: {baseline} = {_git(repo, 'log', '-1', '--format=%h %s', sha)}")
    head = _git(repo, "rev-parse", "HEAD")
    changed = _git(repo, "status", "--porcelain", "--", "longrun_dagster").splitlines()
    print(f"new: working tree {repo} at {_git(repo, 'log', '-1', '--format=%h %s', head)}"
          + (f", with uncommitted changes in {len(changed)} path(s) under longrun_dagster/:"
             f" {', '.join(line[3:] for line in changed[:8])}"
             f"{' ...' if len(changed) > 8 else ''}" if changed
             else ", no uncommitted changes under longrun_dagster/"))
    if sha == head and not changed:
        print("  (old and new are the same code: the table measures noise)")
    tmp = Path(tempfile.mkdtemp(prefix="overheads-baseline-"))
    tree = tmp / "tree"
    _git(repo, "worktree", "add", "--detach", str(tree), sha)
    try:
        trees = {"old": tree, "new": repo}
        for step_ms in steps_ms:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            print(f"model_stage through dg.materialize, {batches} batches x "
                  f"{step_ms:.0f} ms, {repeat} runs each, old/new interleaved:")
            for _ in range(repeat):
                for name, root in trees.items():
                    runs[name].append(_measure(root, batches, step_ms))
            _print_stage(runs)
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _print_stage(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Per version: best and median wall (first model call to the verdict), and for the
    best run model/wall, tail (last model call's end to the verdict) as a share of wall,
    bytes put to the store per committed byte, and the commit record's size."""
    print(f"{'':>5} {'best s':>7} {'median s':>9} {'model/wall':>11} {'tail':>6} "
          f"{'written/committed':>18} {'committed MB':>13} {'manifest B':>11} "
          f"{'new/old':>8}")
    old_best = min(r["wall"] for r in runs["old"])
    for name, got in runs.items():
        top = min(got, key=lambda r: r["wall"])
        ratio = f"{top['wall'] / old_best:.3f}" if name != "old" else ""
        print(f"{name:>5} {top['wall']:>7.2f} {statistics.median(r['wall'] for r in got):>9.2f} "
              f"{top['model'] / top['wall']:>11.2f} {top['tail'] / top['wall']:>6.1%} "
              f"{top['bytes_written'] / top['committed_bytes']:>18.2f} "
              f"{top['committed_bytes'] / 1e6:>13.2f} {top['manifest_bytes']:>11} "
              f"{ratio:>8}")
    medians = {name: statistics.median(r["wall"] for r in got) for name, got in runs.items()}
    print(f"  new/old wall: best {min(r['wall'] for r in runs['new']) / old_best:.3f}, "
          f"median {medians['new'] / medians['old']:.3f}")


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
                             "dg.materialize, --baseline against this working tree")
    parser.add_argument("--only-stage", action="store_true",
                        help="run only the --stage comparison (implies --stage)")
    parser.add_argument("--baseline", default="HEAD",
                        help="git revision measured as 'old' by --stage (default: HEAD)")
    parser.add_argument("--stage-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.stage_child:
        stage_child(args.batches, args.step_ms, args.tree)
        return
    if args.only_stage:
        stage_table(args.batches, args.pipeline_steps, args.repeat, args.baseline)
        return
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
        stage_table(args.batches, args.pipeline_steps, args.repeat, args.baseline)
    dog = Watchdog(lambda at, c: None, interval=30, stall_timeout=900, enforce=False)
    per = best(lambda: [dog.progress(batches_done=i) for i in range(10000)]) / 10000
    print(f"heartbeat progress(): {per * 1e6:.2f} us/step ({per / step:.4%} of a step)")
    guard = VramGuard(choose_backend("host"), Thresholds(0.99, 1.0))
    per = best(lambda: [guard.step() for _ in range(1000)]) / 1000
    print(f"VRAM guard step() (host backend, every step): {per * 1e6:.1f} us "
          f"({per / step:.3%} of a step)")


if __name__ == "__main__":
    main()
