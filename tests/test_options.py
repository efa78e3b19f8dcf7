"""One options model: ``model_stage`` and ``ModelStageComponent`` take the same options with
the same defaults, check them once where the stage is declared, pass Dagster's asset
settings through, and the README's table is the model's."""

import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import ConfigError, model_stage
from longrun_dagster.components import ApiStageComponent, ModelStageComponent
from longrun_dagster.options import ApiOptions, StageOptions, reference_table
from tests.test_components import TYPE, Project, project  # noqa: F401 - the fixture

README = Path(__file__).parent.parent / "README.md"
DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-05")


class Out(pa.DataFrameModel):
    id: str


def fn(batch: pd.DataFrame, stage: Any) -> pd.DataFrame:
    """Copies ids."""
    return batch[["id"]]


def test_model_stage_takes_every_option_in_order_with_its_default() -> None:
    """The decorator's keyword arguments after its Python objects are the options, in the
    model's order, with its defaults (None or () where the model's default is empty)."""
    params = inspect.signature(model_stage).parameters
    names = list(params)
    options = names[names.index("automation_condition") + 1:]
    assert options == list(StageOptions.model_fields)
    for name, field in StageOptions.model_fields.items():
        default = field.get_default(call_default_factory=True)
        given = params[name].default
        assert given == default or (given in (None, ()) and not default), name


def test_component_attributes_are_the_options_plus_its_import_paths() -> None:
    fields = set(ModelStageComponent.model_fields)
    assert set(StageOptions.model_fields) <= fields
    assert fields - set(StageOptions.model_fields) == {
        "name", "fn", "upstream", "schema_", "setup", "partitions", "automation_condition"}


@pytest.mark.parametrize(("marker", "model"), [("options", StageOptions),
                                               ("api-options", ApiOptions)])
def test_readme_options_table_is_the_model(marker: str, model: Any) -> None:
    text = README.read_text()
    table = re.search(rf"<!-- {marker}:start.*?-->\n(.*?)\n<!-- {marker}:end -->", text,
                      re.S)
    assert table is not None, f"README.md lost its {marker} table markers"
    assert table.group(1).strip() == reference_table(model), (
        f"README.md's {marker} table is out of date; run ./scripts/options-table")


def test_api_component_attributes_are_the_options_plus_its_import_paths() -> None:
    fields = set(ApiStageComponent.model_fields)
    assert set(StageOptions.model_fields) | set(ApiOptions.model_fields) <= fields
    assert fields - set(StageOptions.model_fields) - set(ApiOptions.model_fields) == {
        "name", "model_name", "request", "parse", "response_model", "upstream", "schema_",
        "partitions", "automation_condition"}


BAD = [
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"checkpoint_every_batches": 0}, "checkpoint_every_batches", "at least 1"),
    ({"checkpoint_every_seconds": -1.0}, "checkpoint_every_seconds", "positive"),
    ({"max_bad_fraction": 1.5}, "max_bad_fraction", "within 0..1"),
    ({"need_vram_mb": 0}, "need_vram_mb", "positive number of MiB"),
    ({"time_budget_seconds": 0}, "time_budget_seconds", "positive seconds"),
    ({"oom_retries": -1}, "oom_retries", "0 or more"),
    ({"progress_every_seconds": -1.0}, "progress_every_seconds", "0 (every batch)"),
    ({"max_partitions_per_run": -2}, "max_partitions_per_run", "0 (one run"),
    ({"batch_size": "many"}, "batch_size", "valid integer"),
    ({"tags": {"team": 3}}, "tags.team", "valid string"),
    ({"io_manager_key": " "}, "io_manager_key", "a resource key"),
    ({"max_partitions_per_run": 4, "backfill_policy": dg.BackfillPolicy.single_run()},
     "max_partitions_per_run", "or backfill_policy, not both"),
]


@pytest.mark.parametrize(("given", "option", "fix"), BAD,
                         ids=[f"{o}-{i}" for i, (_, o, _) in enumerate(BAD)])
def test_a_wrong_option_fails_where_the_stage_is_declared(given: dict[str, Any], option: str,
                                                          fix: str) -> None:
    """Not at the first run: ``model_stage(...)`` itself raises, naming the option, its
    value and the fix."""
    with pytest.raises(ConfigError) as raised:
        model_stage(upstream="words", schema=Out, name="ids", **given)
    message = str(raised.value)
    assert message.startswith(f"model_stage 'ids': {option} = "), message
    assert fix in message, message


def test_a_wrong_schema_names_the_stage_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"^model_stage 'ids': schema = \{'id': <class 'str'>\}"
                                          r" is wrong: it must be a pandera"):
        model_stage(upstream="words", schema={"id": str}, name="ids")  # type: ignore[arg-type]


def test_a_misspelled_option_is_a_type_error_not_silence() -> None:
    """Python refuses unknown keywords of the decorator; the component refuses unknown
    attributes (test_components)."""
    with pytest.raises(TypeError, match="batchsize"):
        model_stage(upstream="words", schema=Out, batchsize=4)  # type: ignore[call-arg]


EAGER = dg.AutomationCondition.eager()
ASSET_SETTINGS: dict[str, Any] = {
    "owners": ["team:ml", "ana@example.com"], "kinds": ["pytorch"],
    "metadata": {"model": "minilm"}, "description": "Copies ids.", "group_name": "text",
    "key_prefix": ["nlp"], "tags": {"team": "nlp"}, "pool": "gpu",
    "op_tags": {"dagster/priority": "3"}, "required_resource_keys": ["store"],
    "hook_resource_keys": ["gpu"], "io_manager_key": "lr", "code_version": "v7",
    "max_partitions_per_run": 25,
}


def _assert_settings_reached(asset: dg.AssetsDefinition) -> None:
    spec = next(iter(asset.specs))
    assert spec.key == dg.AssetKey(["nlp", "ids"])
    assert list(spec.owners) == ["team:ml", "ana@example.com"]
    assert spec.kinds == {"pytorch"}
    assert spec.metadata["model"] == "minilm" and "dagster/column_schema" in spec.metadata
    assert (spec.description, spec.group_name, spec.code_version) == (
        "Copies ids.", "text", "v7")
    assert spec.tags["team"] == "nlp" and spec.tags["dagster/kind/pytorch"] == ""
    assert spec.automation_condition == EAGER
    assert asset.op.pool == "gpu" and asset.op.tags == {"dagster/priority": "3"}
    assert {"lr", "store", "gpu"} <= asset.required_resource_keys
    assert asset.backfill_policy == dg.BackfillPolicy.multi_run(25)


def test_the_decorator_passes_dagsters_asset_settings_through() -> None:
    asset = model_stage(upstream="words", schema=Out, partitions_def=DAYS, name="ids",
                        automation_condition=EAGER, **ASSET_SETTINGS)(fn)
    _assert_settings_reached(asset)


def test_the_component_passes_the_same_settings_through(project: Project) -> None:  # noqa: F811
    project.write_stage(textwrap.dedent(f"""\
        type: {TYPE}
        attributes:
          name: ids
          fn: {project.name}.models.count
          upstream: words
          schema: {project.name}.models.Counted
          partitions: {project.name}.models.DAYS
          automation_condition: "{{{{ automation_condition.eager() }}}}"
        """) + textwrap.indent(
        "\n".join(f"{k}: {v!r}".replace("'", '"') for k, v in ASSET_SETTINGS.items()),
        "  ") + "\n")
    asset = next(a for a in project.load().assets or [] if isinstance(a, dg.AssetsDefinition)
                 and a.key == dg.AssetKey(["nlp", "ids"]))
    _assert_settings_reached(asset)
