"""validate(): valid rows on, invalid rows quarantined with their failure cases."""

import json

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from longrun_dagster.errors import ConfigError
from longrun_dagster.validation import (
    as_schema,
    empty_frame,
    failure_sample,
    reject_all,
    validate,
)
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
    with pytest.raises(ConfigError, match=r"schema = \{'x': <class 'int'>\} is wrong: it must "
                       "be a pandera DataFrameSchema or a DataFrameModel subclass"):
        as_schema({"x": int})  # type: ignore[arg-type]


def test_rows_are_numbered_from_first_row() -> None:
    """Failure cases and quarantined rows carried the row's position in the frame (4); a
    batch starting at partition row 30 must report row 34."""
    frame = good(10)
    frame.loc[4, "score"] = 7.5
    report = validate(frame, SCHEMA, first_row=30)
    assert list(report.quarantined.index) == [34]
    assert [c["row"] for c in failure_sample(report.failure_cases)] == [34]
    assert json.loads(report.quarantined.loc[34, "row"])["id"] == "r4"
    assert list(report.valid.index) == list(range(9))


@pytest.mark.parametrize("damage", ["wrong_dtype", "extra_column", "wrong_length"])
def test_no_valid_rows_gives_empty_frame_of_the_schema(damage: str) -> None:
    """A report with no valid rows returned an empty slice of the bad frame (the model's
    input for a wrong-length output): its columns and dtypes, not the schema's, leaked
    into the concatenated output."""
    frame = good()
    if damage == "wrong_dtype":
        report = validate(frame.assign(score=frame.score.astype(str)), SCHEMA)
    elif damage == "extra_column":
        report = validate(frame.assign(debug=1), SCHEMA)
    else:
        report = reject_all(frame[["id"]].assign(text="x"), SCHEMA, "<rows>",
                            "one output row per input row", "4 rows returned for 5 inputs",
                            first_row=10)
        assert list(report.quarantined.index) == list(range(10, 15))
    assert len(report.valid) == 0
    assert report.valid.dtypes.to_dict() == validate(good(), SCHEMA).valid.dtypes.to_dict()
    SCHEMA.validate(report.valid)


def test_empty_frame_has_the_schemas_columns() -> None:
    schema = pa.DataFrameSchema({"n": pa.Column("int64"), "free": pa.Column()})
    empty = empty_frame(schema)
    assert list(empty.columns) == ["n", "free"] and len(empty) == 0
    assert empty.dtypes.to_dict() == {"n": np.dtype("int64"), "free": np.dtype(object)}
    schema.validate(empty)
