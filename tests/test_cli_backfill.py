"""README's "Backfill from the CLI" commands, run as written (issue #25, item 9): one
partition materialized in the terminal, then a backfill that a real dagster-daemon
launches. Before, nothing said how to backfill from the CLI, and runs of a backfill sat
QUEUED without a daemon."""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from longrun_dagster import AtomicObjectStoreIOManager

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
pytestmark = [pytest.mark.daemon, pytest.mark.timeout(900)]


def commands() -> list[str]:
    section = README.read_text().split("## Backfill from the CLI", 1)[1]
    [block] = re.findall(r"```bash\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_backfill_commands_commit_every_partition(tmp_path: Path) -> None:
    lines = commands()
    assert lines[0].startswith("export ") and lines[2].endswith("&")
    env = {**os.environ, "LONGRUN_EXAMPLE_ROWS": "16", "PATH":
           f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for assignment in shlex.split(lines[0])[1:]:  # export A=$PWD/... B=...
        name, value = assignment.split("=", 1)
        env[name] = value.replace("$PWD", str(tmp_path))
    Path(env["DAGSTER_HOME"]).mkdir(parents=True)
    (Path(env["DAGSTER_HOME"]) / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def run(line: str) -> subprocess.CompletedProcess[str]:
        argv = [a.replace(".venv/bin/", "") for a in shlex.split(line)]
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    started = time.monotonic()
    first = run(lines[1])
    assert first.returncode == 0, first.stderr[-3000:]
    once = time.monotonic() - started
    again = run(lines[1])  # every stage reused
    assert again.returncode == 0 and again.stderr.count("reusing it") == 3
    reused = time.monotonic() - started - once
    print(f"CLI: first run {once:.1f}s, fully reused {reused:.1f}s")

    daemon_argv = [a.replace(".venv/bin/", "") for a in shlex.split(lines[2].rstrip("& "))]
    with open(tmp_path / "daemon.log", "wb") as log:
        daemon = subprocess.Popen(daemon_argv, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        backfill = run(lines[3])
        assert backfill.returncode == 0, backfill.stderr[-3000:]
        days = re.search(r"--partitions (\S+)", lines[3]).group(1).split(",")  # type: ignore[union-attr]
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                runs = instance.get_runs()
                done = [r for r in runs if r.is_finished]
                if len(runs) >= len(days) + 2 and len(done) == len(runs):
                    break
                time.sleep(2)
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), \
                [(r.run_id, r.status) for r in runs]
    finally:
        daemon.terminate()
        daemon.wait(30)
    io = AtomicObjectStoreIOManager(base_uri=env["LONGRUN_BASE_URI"])
    for day in days:
        for asset in ("normalized", "embeddings", "quality"):
            assert io.partition_store().lookup([asset], day) is not None, (asset, day)
