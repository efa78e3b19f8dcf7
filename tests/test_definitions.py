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
    assert {"records", "normalized", "extracted", "embeddings", "quality",
            "daily_summary"} <= keys
    assert graph.get(dg.AssetKey("embeddings")).parent_keys == {dg.AssetKey("extracted")}
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
    assert re.search(r"extracted +2026-11-01 +committed +247 +0 ", first), first
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


def test_scripts_run_is_quiet_on_a_first_run(tmp_path: Path) -> None:
    """`./scripts/run` on a fresh DAGSTER_HOME: the pipeline's summary, and neither
    Dagster's telemetry banner (the instance it creates opts out) nor a leak warning (the
    first batches' growth is warm-up, not a leak); a dagster.yaml of the user's own is kept."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    home = tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "LONGRUN_BASE_URI": (tmp_path / "lr")
           .as_uri(), "LONGRUN_VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run([str(root / "scripts" / "run"), "--partitions", "2026-11-01"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "quality        2026-11-01   committed" in out, out
    assert "Telemetry" not in out and "usage statistics" not in out, out
    assert "leak" not in out.lower() and "per batch" not in out, out
    assert "telemetry:\n  enabled: false" in (home / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text("run_monitoring:\n  enabled: false\n")  # the user's
    done = subprocess.run([str(root / "scripts" / "run"), "--help"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (home / "dagster.yaml").read_text() == "run_monitoring:\n  enabled: false\n"
