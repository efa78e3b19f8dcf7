"""The example code location loads, and its main command commits, then reuses."""

import re
from pathlib import Path

import dagster as dg
import pytest

import definitions
from definitions.__main__ import main


def test_definitions_load_with_lineage() -> None:
    defs = definitions.defs
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"records", "normalized", "embeddings", "quality", "daily_summary"} <= keys
    assert graph.get(dg.AssetKey("quality")).parent_keys == {dg.AssetKey("embeddings")}
    assert [s.name for s in defs.schedules or []] == ["annotation_schedule"]
    assert [s.name for s in defs.sensors or []] == ["longrun_stalled_runs"]


def test_main_commits_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("")
    monkeypatch.setenv("LONGRUN_BASE_URI", (tmp_path / "lr").as_uri())
    assert main(["--partitions", "2026-11-01"]) == 0
    first = capsys.readouterr().out
    assert "quality        2026-11-01   committed" in first, first
    # the day's 9 blank records are quarantined by the normalized stage's schema, not lost
    assert re.search(r"normalized +2026-11-01 +committed +247 +9 ", first), first
    assert main(["--partitions", "2026-11-01"]) == 0
    second = capsys.readouterr().out
    assert "embeddings     2026-11-01   reused" in second and str(tmp_path / "lr") in second


def test_workspace_loads_in_dagster(tmp_path: Path) -> None:
    """What `dagster dev -w workspace.yaml` loads must validate."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All code locations passed validation" in done.stdout + done.stderr
