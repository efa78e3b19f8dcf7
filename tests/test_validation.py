"""validate(): valid rows on, invalid rows quarantined with their failure cases."""

import json

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster.validation import as_schema, failure_sample, validate
from tests.helpers.pipeline import Scored

SCHEMA = as_schema(Scored)


def good(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "score": np.linspace(0, 1, n),
                         "label": ["low"] * n})


def test_valid_frame_passes_whole() -> None:
    report = validate(good(), SCHEMA)
    assert report.rows_invalid == 0 and len(report.valid) == 5


def test_row_failures_quarantine_only_those_rows_with_cases() -> None:
    frame = good()
    frame.loc[1, "score"] = np.nan
    frame.loc[3, "id"] = ""
    report = validate(frame, SCHEMA)
    assert list(report.valid.id) == ["r0", "r2", "r4"]
    assert list(report.quarantined.index) == [1, 3]
    failures = json.loads(report.quarantined.loc[3, "failures"])
    assert failures[0]["column"] == "id" and "str_length" in failures[0]["check"]
    assert json.loads(report.quarantined.loc[1, "row"])["id"] == "r1"


@pytest.mark.parametrize("damage", ["wrong_dtype", "missing_column", "extra_column"])
def test_frame_wide_failure_quarantines_every_row(damage: str) -> None:
    frame = good()
    if damage == "wrong_dtype":
        frame["score"] = frame["score"].astype(str)
    elif damage == "missing_column":
        frame = frame.drop(columns=["label"])
    else:
        frame["debug"] = 1
    report = validate(frame, SCHEMA)
    assert report.rows_invalid == 5 and len(report.valid) == 0
    assert failure_sample(report.failure_cases)


def test_model_class_and_schema_object_are_both_accepted() -> None:
    schema = pa.DataFrameSchema({"x": pa.Column(int)})
    assert as_schema(schema) is schema
    with pytest.raises(TypeError, match="DataFrameSchema or DataFrameModel"):
        as_schema({"x": int})  # type: ignore[arg-type]
