"""A stage's identity by default (issue #25, items 1 and 2): with no ``code_version`` the
stage's code decides reuse, and the config of the resources it uses is in the fingerprint.

Each test pins what a user saw: an edited stage function reused stale output (the default
``code_version`` was ``"1"``), a fixed function resumed the checkpointed bad batches of the
old one, and a model name changed in the resource config was "reused, the model is not
called".
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
from longrun_dagster.fingerprint import code_identity
from tests.helpers import pipeline

DAY = "2024-01-02"
ROOT = Path(__file__).parent.parent


class Scaled(pa.DataFrameModel):
    id: str
    value: float = pa.Field(le=1.0)


def _one(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": 1.0 * len(batch.text) / 100})


def _edited(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": 0.9 * len(batch.text) / 100})


def _over(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": 7.0})  # every row fails le=1


def _stage(fn: Any, **kw: Any) -> dg.AssetsDefinition:
    options: dict[str, Any] = dict(upstream=pipeline.texts, schema=Scaled,
                                   partitions_def=pipeline.DAYS, batch_size=20,
                                   checkpoint_every_batches=1, name="scaled")
    options.update(kw)
    return model_stage(**options)(fn)


@pytest.fixture
def io(tmp_path: Path) -> AtomicObjectStoreIOManager:
    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    assert dg.materialize([pipeline.texts], partition_key=DAY,
                          resources={"io_manager": io}).success
    return io


def _run(io: AtomicObjectStoreIOManager, stage: dg.AssetsDefinition, **kw: Any
         ) -> dg.ExecuteInProcessResult:
    resources = {"io_manager": io, **kw.pop("resources", {})}
    return dg.materialize([pipeline.texts, stage], selection=[stage], partition_key=DAY,
                          resources=resources, raise_on_error=False, **kw)


def _meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return pipeline.materialization_meta(result, "scaled")


def _values(io: AtomicObjectStoreIOManager) -> list[float]:
    _, frame = io.partition_store().load(["scaled"], DAY)
    return [round(v, 6) for v in frame["value"]]


def test_an_edit_to_the_stage_function_recomputes(io: AtomicObjectStoreIOManager) -> None:
    """code_version defaulted to "1": the edited function (1.0 -> 0.9) reused old values."""
    assert _run(io, _stage(_one)).success
    before = _values(io)
    again = _run(io, _stage(_one))
    assert again.success and _meta(again)["reused"] is True  # unchanged code: reused
    edited = _run(io, _stage(_edited))
    assert edited.success and _meta(edited)["reused"] is False
    assert _values(io) == [round(v * 0.9, 6) for v in before]


def test_the_default_code_version_is_the_codes_digest_and_shows_in_dagster() -> None:
    one, edited = _stage(_one), _stage(_edited)
    key = dg.AssetKey("scaled")
    assert one.code_versions_by_key[key] != edited.code_versions_by_key[key]
    assert one.code_versions_by_key[key] == _stage(_one).code_versions_by_key[key]
    assert _stage(_one, code_version="7").code_versions_by_key[key] == "7"


def test_an_explicit_code_version_pins_identity(io: AtomicObjectStoreIOManager) -> None:
    """Setting code_version yourself says "these edits do not change the output"."""
    assert _run(io, _stage(_one, code_version="v1")).success
    edited = _run(io, _stage(_edited, code_version="v1"))
    assert edited.success and _meta(edited)["reused"] is True


def test_a_checkpoint_of_other_code_is_never_resumed(io: AtomicObjectStoreIOManager) -> None:
    """Over budget, then the function fixed without a code_version bump: the fix resumed
    the checkpointed bad batches of the old code."""
    failed = _run(io, _stage(_over))
    assert not failed.success
    fixed = _run(io, _stage(_one))
    assert fixed.success
    meta = _meta(fixed)
    assert meta["resumed_from_batch"] in (0, None) and meta["model_calls"] == meta["batches"]
    assert all(v <= 1.0 for v in _values(io))


def test_setup_is_part_of_the_identity() -> None:
    def load_a(stage: StageContext) -> float:
        return 1.0

    def load_b(stage: StageContext) -> float:
        return 2.0

    assert code_identity(_one, load_a) != code_identity(_one, load_b)
    assert code_identity(_one, load_a) == code_identity(_one, load_a)


SCALE = 1.0


def _uses_a_constant(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": SCALE})


def _calls_a_helper(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": _helper(len(batch))})


def _helper(n: int) -> float:
    return n / 1000


def test_module_constants_and_helpers_of_the_same_module_are_seen() -> None:
    global SCALE
    before = code_identity(_uses_a_constant)
    SCALE = 0.5
    try:
        assert code_identity(_uses_a_constant) != before
    finally:
        SCALE = 1.0
    helper_before = code_identity(_calls_a_helper)
    original = _helper.__code__
    _helper.__code__ = (lambda n: n / 2000).__code__
    try:
        assert code_identity(_calls_a_helper) != helper_before
    finally:
        _helper.__code__ = original


def test_mutable_globals_are_not_identity() -> None:
    """A counter the function appends to (pipeline.CALLS) changes as it runs; it is not
    what the function computes, and a digest of it would recompute every run."""
    before = code_identity(pipeline.score_batch)
    pipeline.CALLS.extend([1, 2, 3])
    try:
        assert code_identity(pipeline.score_batch) == before
    finally:
        pipeline.CALLS.clear()


def test_the_digest_is_the_same_in_every_process() -> None:
    """Each step of the multiprocess executor is a fresh process: its digest must equal
    the one of the process that committed."""
    script = ("from longrun_dagster.fingerprint import code_identity; "
              "from tests.helpers import pipeline; "
              "print(code_identity(pipeline.score_batch, pipeline.load_model))")
    outs = {subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in (1, 2)}
    assert outs == {code_identity(pipeline.score_batch, pipeline.load_model)}


# -- resource config --------------------------------------------------------------------


class Llm(dg.ConfigurableResource):
    model: str = "small-v1"
    api_key: str = ""
    temperature: float = 0.0


def _with_llm(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
    factor = 0.5 if stage.resources.llm.model == "small-v1" else 0.25
    return pd.DataFrame({"id": batch.id.to_numpy(), "value": factor})


def test_resource_config_is_in_the_fingerprint(io: AtomicObjectStoreIOManager,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--config-json '{"resources":{"llm":{"config":{"model":"bigger-model-v2"}}}}' gave
    "reusing it, the model is not called"."""
    monkeypatch.setenv("LLM_KEY", "first-key")
    stage = _stage(_with_llm, required_resource_keys=["llm"])
    llm = Llm(api_key=dg.EnvVar("LLM_KEY"))
    assert _run(io, stage, resources={"llm": llm}).success
    bigger = _run(io, stage, resources={"llm": llm}, run_config={
        "resources": {"llm": {"config": {"model": "bigger-model-v2",
                                         "api_key": {"env": "LLM_KEY"}}}}})
    assert bigger.success and _meta(bigger)["reused"] is False
    assert set(_values(io)) == {0.25}
    hotter = _run(io, stage, resources={"llm": Llm(api_key=dg.EnvVar("LLM_KEY"),
                                                     temperature=0.7)})
    assert hotter.success and _meta(hotter)["reused"] is False


def test_a_rotated_api_key_does_not_recompute(io: AtomicObjectStoreIOManager,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An EnvVar (or a field named like a secret) is left out: rotating the key must not
    recompute 10,000 partitions."""
    stage = _stage(_with_llm, required_resource_keys=["llm"])
    monkeypatch.setenv("LLM_KEY", "first-key")
    assert _run(io, stage, resources={"llm": Llm(api_key=dg.EnvVar("LLM_KEY"))}).success
    monkeypatch.setenv("LLM_KEY", "rotated-key")
    again = _run(io, stage, resources={"llm": Llm(api_key=dg.EnvVar("LLM_KEY"))})
    assert again.success and _meta(again)["reused"] is True
    plain = _run(io, stage, resources={"llm": Llm(api_key="typed-in-key")})
    assert plain.success and _meta(plain)["reused"] is True
