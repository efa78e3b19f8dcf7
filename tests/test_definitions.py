"""The example code location loads, and its main command commits, then reuses."""

from pathlib import Path

import dagster as dg
import pytest

import definitions
from definitions.__main__ import main


def test_definitions_load_with_lineage() -> None:
    defs = definitions.defs
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"records", "embeddings", "quality"} <= keys
    assert graph.get(dg.AssetKey("quality")).parent_keys == {dg.AssetKey("embeddings")}


def test_main_commits_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("")
    monkeypatch.setenv("LONGRUN_BASE_URI", (tmp_path / "lr").as_uri())
    assert main(["--partitions", "2024-01-01"]) == 0
    first = capsys.readouterr().out
    assert "quality      2024-01-01   committed" in first
    assert main(["--partitions", "2024-01-01"]) == 0
    second = capsys.readouterr().out
    assert "quality      2024-01-01   reused" in second and str(tmp_path / "lr") in second
