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


class Shell:
    """The README block's environment (its export line) and its commands, run as written
    with the venv's tools on PATH."""

    def __init__(self, tmp_path: Path) -> None:
        self.lines = commands()
        assert self.lines[0].startswith("export ") and self.lines[2].endswith("&")
        self.env = {**os.environ, "LONGRUN_EXAMPLE_ROWS": "16", "PATH":
                    f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for assignment in shlex.split(self.lines[0])[1:]:  # export A=$PWD/... B=...
            name, value = assignment.split("=", 1)
            self.env[name] = value.replace("$PWD", str(tmp_path))
        home = Path(self.env["DAGSTER_HOME"])
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    def argv(self, line: str) -> list[str]:
        return [a.replace(".venv/bin/", "") for a in shlex.split(line.rstrip("& "))]

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(line), cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done


def test_the_readme_materialize_command_commits_then_reuses(tmp_path: Path) -> None:
    shell = Shell(tmp_path)
    started = time.monotonic()
    shell.run(shell.lines[1])
    once = time.monotonic() - started
    again = shell.run(shell.lines[1])  # every stage reused
    assert again.stderr.count("reusing it, the model is not called") == 4  # 4 stages
    print(f"CLI: first run {once:.1f}s, fully reused {time.monotonic() - started - once:.1f}s")


@pytest.mark.slow
def test_the_readme_backfill_commands_commit_every_partition(tmp_path: Path) -> None:
    """The daemon's part (a few minutes of model loads on 2 cores: LONGRUN_SLOW=1)."""
    shell = Shell(tmp_path)
    shell.run(shell.lines[1])
    with open(tmp_path / "daemon.log", "wb") as log:
        daemon = subprocess.Popen(shell.argv(shell.lines[2]), cwd=ROOT, env=shell.env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        shell.run(shell.lines[3])
        found = re.search(r"--partitions (\S+)", shell.lines[3])
        assert found is not None
        days = found.group(1).split(",")
        with dg.DagsterInstance.from_config(shell.env["DAGSTER_HOME"]) as instance:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                runs = instance.get_runs()
                if len(runs) >= len(days) + 1 and all(r.is_finished for r in runs):
                    break
                time.sleep(2)
            assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), \
                [(r.run_id, r.status) for r in runs]
    finally:
        daemon.terminate()
        daemon.wait(30)
    io = AtomicObjectStoreIOManager(base_uri=shell.env["LONGRUN_BASE_URI"])
    for day in days:
        for asset in ("normalized", "extracted", "embeddings", "quality"):
            assert io.partition_store().lookup([asset], day) is not None, (asset, day)
