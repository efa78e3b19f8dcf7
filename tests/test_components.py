"""ModelStageComponent: a model stage declared in a defs.yaml loads, commits and reuses like
the decorator; bad attributes say what is wrong; dg sees it; the example uses it."""

import importlib
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from longrun_dagster import AtomicObjectStoreIOManager, ConfigError, model_stage
from longrun_dagster.components import ModelStageComponent
from tests.helpers.pipeline import materialization_meta

ROOT = Path(__file__).parent.parent
TYPE = "longrun_dagster.components.ModelStageComponent"
DAY = "2024-01-02"

MODELS = '''
import dagster as dg
import pandas as pd
import pandera.pandas as pa

DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")
NOT_PARTITIONS = "daily"


@dg.asset(partitions_def=DAYS)
def words(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"{context.partition_key}-{i}" for i in range(10)],
                         "text": ["a b c"[: 1 + 2 * (i % 3)] for i in range(10)]})


class Counted(pa.DataFrameModel):
    id: str
    n: int = pa.Field(ge=1)


def count(batch: pd.DataFrame, stage) -> pd.DataFrame:
    """Words per text."""
    return pd.DataFrame({"id": batch.id.to_numpy(),
                         "n": batch.text.str.split().str.len().to_numpy()})
'''


@dataclass
class Project:
    """A throwaway dg project on sys.path: src/<name>/{models.py, defs/upstream.py,
    defs/stage/defs.yaml}."""

    root: Path
    name: str

    def write_stage(self, yaml_text: str) -> None:
        (self.root / "src" / self.name / "defs" / "stage" / "defs.yaml").write_text(yaml_text)

    def write_attributes(self, attributes: dict[str, Any]) -> None:
        self.write_stage(yaml.safe_dump({"type": TYPE, "attributes": attributes}))

    def attributes(self, **overrides: Any) -> dict[str, Any]:
        return {"name": "counts", "fn": f"{self.name}.models.count", "upstream": "words",
                "schema": f"{self.name}.models.Counted",
                "partitions": f"{self.name}.models.DAYS", "batch_size": 4, **overrides}

    def load(self) -> dg.Definitions:
        return dg.load_from_defs_folder(path_within_project=self.root)

    @property
    def models(self) -> Any:
        return importlib.import_module(f"{self.name}.models")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    name = f"stageproj_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "src" / name
    (pkg / "defs" / "stage").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.dg]\ndirectory_type = "project"\n\n[tool.dg.project]\nroot_module = "{name}"\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS)
    (pkg / "defs" / "__init__.py").write_text("")
    (pkg / "defs" / "upstream.py").write_text(f"from {name}.models import words as words\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield Project(tmp_path, name)
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def stage_meta(result: dg.ExecuteInProcessResult, asset: str = "counts") -> dict[str, Any]:
    return materialization_meta(result, asset)


def test_yaml_stage_commits_then_reuses_like_the_decorator(project: Project,
                                                           tmp_path: Path) -> None:
    """Written as a user would (unquoted date, inline mapping); switching a stage from the
    decorator to YAML must not recompute its committed partitions."""
    project.write_stage(textwrap.dedent(f"""\
        type: {TYPE}
        attributes:
          name: counts
          fn: {project.name}.models.count
          upstream: words
          schema: {project.name}.models.Counted
          partitions: {{type: daily, start_date: 2024-01-01, end_date: 2024-01-05}}
          batch_size: 4
          checkpoint_every_batches: 1
          code_version: wc-1
          config: {{lang: en}}
          group_name: text
        """))
    defs = project.load()
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    assets = list(defs.assets or [])

    first = dg.materialize(assets, partition_key=DAY, resources={"io_manager": io})
    meta = stage_meta(first)
    assert meta["reused"] is False and meta["model_calls"] == 3 and meta["rows"] == 10
    checks = first.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("schema_valid_rows", True)]

    again = dg.materialize(assets, partition_key=DAY, resources={"io_manager": io},
                           selection=["counts"])
    assert stage_meta(again)["reused"] is True and stage_meta(again)["model_calls"] == 3

    m = project.models
    decorated = model_stage(upstream="words", schema=m.Counted, partitions_def=m.DAYS,
                            batch_size=4, checkpoint_every_batches=1, code_version="wc-1",
                            config={"lang": "en"}, name="counts", group_name="text")(m.count)
    same = dg.materialize([m.words, decorated], partition_key=DAY,
                          resources={"io_manager": io}, selection=["counts"])
    assert stage_meta(same)["reused"] is True


def test_every_attribute_reaches_the_asset(project: Project) -> None:
    project.write_attributes(project.attributes(
        code_version="v7", max_bad_fraction=0.25, hook_resource_keys=["gpu"], pool="gpu",
        group_name="text", description="Counts words.", tags={"team": "nlp"},
        op_tags={"dagster/priority": "3"}, need_vram_mb=512, oom_retries=1,
        sigterm_grace_seconds=5, time_budget_seconds=600, one_row_per_input=False,
        max_partitions_per_run=25))
    asset = next(a for a in project.load().assets or [] if isinstance(a, dg.AssetsDefinition)
                 and a.key == dg.AssetKey("counts"))
    spec = next(iter(asset.specs))
    assert asset.partitions_def is project.models.DAYS
    assert [d.asset_key for d in spec.deps] == [dg.AssetKey("words")]
    assert (spec.group_name, spec.code_version, spec.description) == (
        "text", "v7", "Counts words.")
    assert spec.tags == {"longrun/stage": "true", "team": "nlp"}
    assert asset.op.tags == {"dagster/priority": "3"} and asset.op.pool == "gpu"
    assert asset.required_resource_keys == {"io_manager", "gpu"}
    assert spec.metadata["longrun/max_bad_fraction"] == 0.25
    assert spec.metadata["longrun/batch_size"] == 4
    assert asset.backfill_policy == dg.BackfillPolicy.multi_run(25)


def test_several_upstreams_in_yaml(project: Project) -> None:
    project.write_attributes(project.attributes(
        upstream={"words": "words", "more": "more/words"}, join_on="id"))
    asset = next(a for a in project.load().assets or [] if isinstance(a, dg.AssetsDefinition)
                 and a.key == dg.AssetKey("counts"))
    spec = next(iter(asset.specs))
    assert {d.asset_key for d in spec.deps} == {dg.AssetKey("words"),
                                                dg.AssetKey(["more", "words"])}


def test_every_attribute_is_described() -> None:
    """The descriptions are what dg and the UI show next to each attribute."""
    schema = ModelStageComponent.get_model_cls().model_json_schema()  # type: ignore[union-attr]
    undescribed = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert undescribed == [] and "schema" in schema["properties"]


BAD = [
    ({"fn": "{p}.models.nope"}, "fn", "has no attribute 'nope'"),
    ({"fn": "nosuchpackage.models.count"}, "fn", "does not import"),
    ({"fn": "count"}, "fn", "package.module.name"),
    ({"fn": "{p}.models.DAYS"}, "fn", "not a function"),
    ({"schema": "{p}.models.count"}, "schema", "not a pandera DataFrameModel"),
    ({"setup": "{p}.models.nope"}, "setup", "has no attribute 'nope'"),
    ({"partitions": "{p}.models.NOT_PARTITIONS"}, "partitions", "not a PartitionsDefinition"),
    ({"partitions": {"type": "daily", "start_date": "yesterday"}}, "partitions",
     "Dagster rejects it"),
    ({"batch_size": -4}, "batch_size", "at least 1"),
    ({"checkpoint_every_batches": 0}, "checkpoint_every_batches", "at least 1"),
    ({"checkpoint_every_seconds": 0.0}, "checkpoint_every_seconds", "positive"),
    ({"max_bad_fraction": 2.0}, "max_bad_fraction", "within 0..1"),
    ({"oom_retries": -1}, "oom_retries", "0 or more"),
    ({"time_budget_seconds": -5.0}, "time_budget_seconds", "positive"),
    ({"max_partitions_per_run": -1}, "max_partitions_per_run", "0 (one run for the whole"),
    ({"upstream": " "}, "upstream", "asset key"),
]


@pytest.mark.parametrize(("overrides", "attribute", "fix"), BAD,
                         ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD)])
def test_bad_attribute_names_attribute_value_and_fix(project: Project, overrides: dict[str, Any],
                                                     attribute: str, fix: str) -> None:
    filled = {k: v.format(p=project.name) if isinstance(v, str) else v
              for k, v in overrides.items()}
    project.write_attributes(project.attributes(**filled))
    with pytest.raises(Exception) as raised:
        project.load()
    cause = raised.value.__cause__
    assert isinstance(cause, ConfigError), raised.value
    message = str(cause)
    assert f"'counts': attribute {attribute} = {filled[attribute]!r} is wrong" in message, message
    assert fix in message, message


def test_misspelled_attribute_is_refused_with_its_line(project: Project) -> None:
    """Dagster's schema check, not ours: it names the attribute and its defs.yaml line."""
    project.write_attributes(project.attributes(batchsize=4))
    with pytest.raises(Exception) as raised:
        project.load()
    message = str(raised.value.__cause__)
    assert "attributes.batchsize at " in message and "defs.yaml:" in message, message
    assert "Extra inputs are not permitted" in message, message


def test_example_quality_stage_comes_from_its_defs_yaml() -> None:
    import definitions
    from definitions.assets import DAYS

    asset = definitions.defs.resolve_assets_def("quality")
    spec = next(iter(asset.specs))
    origin = spec.metadata["dagster/component_origin"].instance
    assert isinstance(origin, ModelStageComponent) and origin.name == "quality"
    assert [c.name for c in asset.check_specs] == ["schema_valid_rows"]
    assert asset.op.pool == "gpu" and asset.partitions_def is DAYS
    assert (spec.group_name, spec.code_version) == ("annotation", "logreg-1")
    assert asset.required_resource_keys == {"io_manager", "gpu", "heartbeat"}
    assert spec.tags["longrun/stage"] == "true"


def dg_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": sys.prefix,
           "NO_COLOR": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "dg"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=env)


def test_dg_check_defs_passes(tmp_path: Path) -> None:
    done = dg_cli("check", "defs", home=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "All component YAML validated successfully" in out, out
    assert "All definitions loaded successfully" in out, out


def test_dg_list_components_shows_ours(tmp_path: Path) -> None:
    import json

    done = dg_cli("list", "components", "--json", home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    items = {i["key"]: i["summary"] for i in json.loads(done.stdout)["items"]}
    assert items[TYPE].startswith("A crash-proof, validated model stage"), items
