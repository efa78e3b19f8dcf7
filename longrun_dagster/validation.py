"""pandera in, a report out: valid rows, quarantined rows with their failure cases, counts.

No Dagster and no storage here. Validation is lazy (every failure at once). A failure tied
to a row quarantines that row; a failure of the whole frame (a missing or extra column, a
wrong column dtype) quarantines every row, since none of them can be trusted.
"""

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.api.dataframe.model import DataFrameModel

Schema = pa.DataFrameSchema | type[DataFrameModel[Any, Any]]
QUARANTINE_COLUMNS = ["row", "failures"]


@dataclass(frozen=True)
class Report:
    """The outcome of validating one frame."""

    valid: pd.DataFrame
    quarantined: pd.DataFrame
    """One row per invalid row: ``row`` (the row as JSON) and ``failures`` (JSON list of
    ``{"column", "check", "value"}``)."""
    failure_cases: pd.DataFrame
    """pandera's failure cases: ``column``, ``check``, ``failure_case``, ``index``."""

    @property
    def rows_checked(self) -> int:
        return len(self.valid) + len(self.quarantined)

    @property
    def rows_invalid(self) -> int:
        return len(self.quarantined)


def as_schema(schema: Schema) -> pa.DataFrameSchema:
    """A DataFrameSchema from a DataFrameSchema or a DataFrameModel class."""
    if isinstance(schema, pa.DataFrameSchema):
        return schema
    if isinstance(schema, type) and issubclass(schema, DataFrameModel):
        converted: pa.DataFrameSchema = schema.to_schema()
        return converted
    raise TypeError(
        f"schema must be a pandera DataFrameSchema or DataFrameModel subclass, got "
        f"{schema!r}; import pandera.pandas as pa and declare one"
    )


def validate(frame: pd.DataFrame, schema: pa.DataFrameSchema) -> Report:
    """Split ``frame`` (index reset to positions) into valid and quarantined rows."""
    frame = frame.reset_index(drop=True)
    try:
        return Report(schema.validate(frame, lazy=True), _empty_quarantine(), _no_cases())
    except pa.errors.SchemaErrors as exc:
        cases = _cases(exc.failure_cases)
    bad = _bad_positions(cases, len(frame))
    good = frame.drop(index=sorted(bad))
    try:
        valid = schema.validate(good, lazy=True) if len(good) else good
    except pa.errors.SchemaErrors as exc:  # a frame-wide check (unique, ...) still fails
        cases = pd.concat([cases, _cases(exc.failure_cases)], ignore_index=True)
        bad, valid = set(range(len(frame))), frame.iloc[0:0]
    return Report(valid.reset_index(drop=True), _quarantine(frame, bad, cases), cases)


def reject_all(frame: pd.DataFrame, column: str, check: str, value: str) -> Report:
    """Quarantine every row of ``frame`` for one frame-wide reason (a model that returned
    the wrong number of rows: its inputs are quarantined, since none has a trusted output)."""
    frame = frame.reset_index(drop=True)
    cases = pd.DataFrame({"column": [column], "check": [check], "failure_case": [value],
                          "index": [None]})
    return Report(frame.iloc[0:0], _quarantine(frame, set(range(len(frame))), cases), cases)


def _cases(raw: pd.DataFrame) -> pd.DataFrame:
    cases = raw.reindex(columns=["column", "check", "failure_case", "index"]).copy()
    cases["column"] = cases["column"].astype(str)
    cases["check"] = cases["check"].astype(str)
    cases["failure_case"] = cases["failure_case"].map(_text)
    return cases.reset_index(drop=True)


def _bad_positions(cases: pd.DataFrame, rows: int) -> set[int]:
    if cases["index"].isna().any():
        return set(range(rows))
    return {int(i) for i in cases["index"]}


def _quarantine(frame: pd.DataFrame, bad: set[int], cases: pd.DataFrame) -> pd.DataFrame:
    if not bad:
        return _empty_quarantine()
    positions = sorted(bad)
    rows = frame.iloc[positions].to_json(orient="records", lines=True, default_handler=str)
    records = cases.to_dict("records")
    frame_wide = [_failure(c) for c in records if pd.isna(c["index"])]
    per_row: dict[int, list[dict[str, str]]] = {}
    for case in records:
        if not pd.isna(case["index"]):
            per_row.setdefault(int(case["index"]), []).append(_failure(case))
    failures = [json.dumps(frame_wide + per_row.get(p, []), sort_keys=True) for p in positions]
    return pd.DataFrame({"row": rows.strip().split("\n"), "failures": failures},
                        index=pd.Index(positions, name="position"))


def _failure(case: dict[Any, Any]) -> dict[str, str]:
    return {"column": case["column"], "check": case["check"], "value": case["failure_case"]}


def _text(value: Any) -> str:
    return "None" if value is None else str(value)


def _empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in QUARANTINE_COLUMNS},
                        index=pd.Index([], dtype="int64", name="position"))


def _no_cases() -> pd.DataFrame:
    return pd.DataFrame({"column": [], "check": [], "failure_case": [], "index": []})


def failure_sample(cases: pd.DataFrame, limit: int = 5) -> list[dict[str, Any]]:
    """The first ``limit`` failure cases as plain dicts (for errors and metadata)."""
    return [{"column": c["column"], "check": c["check"], "value": c["failure_case"],
             "row": None if pd.isna(c["index"]) else int(c["index"])}
            for c in cases.head(limit).to_dict("records")]
