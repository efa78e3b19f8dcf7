"""A fully reused run of the example pipeline, launched the usual way: the CLI, under the
code location's executor (a process per step), every stage already committed.

    git worktree add /tmp/lr-before 6f0ce2a   # the code before (spawned steps, torch at import)
    .venv/bin/python bench/reuse_cli.py --before /tmp/lr-before [--repeats 3]

For each of the code before and this checkout: one run that computes partition
2026-11-01 (not timed), then ``--repeats`` reused runs of
``dagster asset materialize -m definitions --select '*' --partition 2026-11-01``,
old and new interleaved, each in its own DAGSTER_HOME and base URI. Prints each run's
wall time and the medians. The figure users meet is the whole command, not the steps.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTITION = "2026-11-01"


def materialize(code: Path, home: Path, base: Path) -> tuple[float, str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "LONGRUN_BASE_URI": base.as_uri(),
           "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
         "definitions", "--select", "*", "--partition", PARTITION],
        cwd=code, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{code}: the run failed:\n{done.stderr[-3000:]}")
    return wall, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True,
                        help="a worktree of the code to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    codes = {"before": args.before.resolve(), "after": ROOT}
    with tempfile.TemporaryDirectory(prefix="reuse-cli-") as tmp:
        places = {}
        for name, code in codes.items():
            home, base = Path(tmp) / name / "home", Path(tmp) / name / "lr"
            home.mkdir(parents=True)
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            places[name] = (home, base)
            wall, _ = materialize(code, home, base)
            print(f"{name}: computing run {wall:.1f} s", flush=True)
        walls: dict[str, list[float]] = {name: [] for name in codes}
        for i in range(args.repeats):
            for name, code in codes.items():
                wall, log = materialize(code, *places[name])
                reused = log.count("reusing it, the model is not called")
                walls[name].append(wall)
                print(f"{name} #{i + 1}: {wall:.1f} s ({reused} stages reused)", flush=True)
    before, after = (statistics.median(walls[n]) for n in ("before", "after"))
    print(f"median of {args.repeats}: before {before:.1f} s, after {after:.1f} s "
          f"(after/before {after / before:.2f})")


if __name__ == "__main__":
    main()
