"""pandera in, a report out: valid rows, quarantined rows with their failure cases, counts.

No Dagster and no storage here. Validation is lazy (every failure at once). A failure tied
to a row quarantines that row; a failure of the whole frame (a missing or extra column, a
wrong column dtype) quarantines every row, since none of them can be trusted. Rows are
numbered as users look them up: from ``first_row``, the partition row of the frame's first.
"""

import functools
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pandera.api.dataframe.model import DataFrameModel

from longrun_dagster.errors import ConfigError

Schema = pa.DataFrameSchema | type[DataFrameModel[Any, Any]]
QUARANTINE_COLUMNS = ["row", "failures"]


@dataclass(frozen=True)
class Report:
    """The outcome of validating one frame."""

    valid: pd.DataFrame
    """The valid rows; with none, an empty frame of the schema (``empty_frame``)."""
    quarantined: pd.DataFrame
    """One row per invalid row, indexed by its row number (``position``): ``row`` (the row
    as JSON) and ``failures`` (JSON list of ``{"column", "check", "value"}``)."""
    failure_cases: pd.DataFrame
    """pandera's failure cases: ``column``, ``check``, ``failure_case``, ``index`` (the row
    number; missing for a failure of the whole frame)."""
    valid_rows: pd.Index | None = None
    """The row numbers of ``valid``'s rows (None where no frame was validated)."""

    @property
    def rows_checked(self) -> int:
        return len(self.valid) + len(self.quarantined)

    @property
    def rows_invalid(self) -> int:
        return len(self.quarantined)

    @property
    def clean(self) -> bool:
        """No row quarantined and no failure case (of a row or of the whole frame)."""
        return not len(self.quarantined) and not len(self.failure_cases)


def as_schema(schema: Schema) -> pa.DataFrameSchema:
    """A DataFrameSchema from a DataFrameSchema or a DataFrameModel class; ``ConfigError``
    for one that drops invalid rows (pandera's ``drop_invalid_rows``), which would make
    bad rows vanish instead of being quarantined and counted against the budget."""
    if isinstance(schema, pa.DataFrameSchema):
        return _no_dropping(schema)
    if isinstance(schema, type) and issubclass(schema, DataFrameModel):
        converted: pa.DataFrameSchema = schema.to_schema()
        return _no_dropping(converted)
    raise ConfigError(
        f"schema = {schema!r} is wrong: it must be a pandera DataFrameSchema or a "
        "DataFrameModel subclass (the class, not an instance); import pandera.pandas as pa "
        "and declare one"
    )


def _no_dropping(schema: pa.DataFrameSchema) -> pa.DataFrameSchema:
    dropping = [f"column {name!r}" for name, column in schema.columns.items()
                if getattr(column, "drop_invalid_rows", False)]
    if getattr(schema, "drop_invalid_rows", False):
        dropping.insert(0, "the schema")
    if dropping:
        raise ConfigError(
            f"schema {schema.name or ''!s}: {', '.join(dropping)} set drop_invalid_rows=True, "
            "which makes pandera drop invalid rows without a word. A stage quarantines "
            "invalid rows itself (with their failure cases, counted against "
            "max_bad_fraction): remove drop_invalid_rows (or set it False)")
    return schema


def validate(frame: pd.DataFrame, schema: pa.DataFrameSchema, *, first_row: int = 0,
             rows: pd.Index | None = None) -> Report:
    """Split ``frame`` into valid and quarantined rows, numbering its rows from
    ``first_row`` (or as ``rows`` says)."""
    frame = _numbered(frame, first_row, rows)
    try:
        checked = schema.validate(frame, lazy=True)
        return Report(_valid(checked, schema), empty_quarantine(), no_cases(), checked.index)
    except pa.errors.SchemaErrors as exc:
        cases = _columns_named(_cases(exc.failure_cases), frame)
    bad = _bad_rows(cases, frame.index)
    good = frame.drop(index=sorted(bad))
    try:
        valid = schema.validate(good, lazy=True) if len(good) else good
    except pa.errors.SchemaErrors as exc:  # a frame-wide check (unique, ...) still fails
        cases = pd.concat([cases, _cases(exc.failure_cases)], ignore_index=True)
        bad, valid = set(frame.index), good.iloc[0:0]
    return Report(_valid(valid, schema), _quarantine(frame, bad, cases), cases, valid.index)


def reject_all(frame: pd.DataFrame, schema: pa.DataFrameSchema, column: str, check: str,
               value: str, *, first_row: int = 0) -> Report:
    """Quarantine every row of ``frame`` for one frame-wide reason (a model that returned
    the wrong number of rows: its inputs are quarantined, since none has a trusted output).
    No row is valid, so ``valid`` is an empty frame of ``schema``, not of ``frame``."""
    frame = _numbered(frame, first_row)
    cases = pd.DataFrame({"column": [column], "check": [check], "failure_case": [value],
                          "index": [None]})
    return Report(empty_frame(schema), _quarantine(frame, set(frame.index), cases), cases)


def reject_rows(rows: pd.DataFrame, failures: list[dict[str, str]], *,
                first_row: int = 0, numbers: pd.Index | None = None) -> Report:
    """Quarantine each of ``rows`` for its own reason (an API answer that is not an answer:
    ``failures[i]`` is row i's ``{"column", "check", "value"}``), numbering them from
    ``first_row`` (or as ``numbers`` says)."""
    rows = _numbered(rows, first_row, numbers)
    cases = pd.DataFrame({"column": [f["column"] for f in failures],
                          "check": [f["check"] for f in failures],
                          "failure_case": [f["value"] for f in failures],
                          "index": list(rows.index)})
    return Report(rows.iloc[0:0], _quarantine(rows, set(rows.index), cases), cases)


def combined(report: Report, rejected: Report) -> Report:
    """``report`` with ``rejected``'s quarantined rows and failure cases after its own."""
    if not len(rejected.quarantined):
        return report
    frames = [f for f in (report.quarantined, rejected.quarantined) if len(f)]
    cases = pd.concat([f for f in (report.failure_cases, rejected.failure_cases) if len(f)],
                      ignore_index=True)
    cases = cases.sort_values("index", na_position="first", kind="stable",
                              ignore_index=True)  # in row order, frame-wide failures first
    return Report(report.valid, pd.concat(frames).sort_index(kind="stable"), cases,
                  report.valid_rows)


def empty_frame(schema: pa.DataFrameSchema) -> pd.DataFrame:
    """A frame of no rows with ``schema``'s columns and dtypes: what a frame with no valid
    rows contributes to an output. A column without a dtype gets ``object``, which says
    nothing about the values other frames hold (concatenation leaves empty frames out)."""
    columns = {name: pd.Series([], dtype=_dtype(column.dtype or schema.dtype))
               for name, column in schema.columns.items() if not column.regex}
    return pd.DataFrame(columns, index=pd.RangeIndex(0))


def _dtype(dtype: Any) -> Any:
    return object if dtype is None else dtype.type


def _numbered(frame: pd.DataFrame, first_row: int, rows: pd.Index | None = None
              ) -> pd.DataFrame:
    """``frame`` indexed by row number, so pandera's failure cases name the user's row."""
    if rows is not None:
        return frame.set_axis(rows, axis="index")
    return frame.set_axis(pd.RangeIndex(first_row, first_row + len(frame)), axis="index")


def _valid(valid: pd.DataFrame, schema: pa.DataFrameSchema) -> pd.DataFrame:
    return valid.reset_index(drop=True) if len(valid) else empty_frame(schema)


def _cases(raw: pd.DataFrame) -> pd.DataFrame:
    cases = raw.reindex(columns=["column", "check", "failure_case", "index"]).copy()
    cases["column"] = cases["column"].astype(str)
    cases["check"] = cases["check"].astype(str)
    cases["failure_case"] = cases["failure_case"].map(_text)
    return cases.reset_index(drop=True)


WRONG_COLUMNS = "wrong_columns"
_COLUMN_CHECKS = {"column_in_dataframe": "missing", "column_in_schema": "unexpected"}


def _columns_named(cases: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """pandera's one case per missing or unexpected column, as one case that names them
    all beside the columns the function returned (a misspelled column, not bad rows)."""
    wrong = cases["check"].isin(list(_COLUMN_CHECKS))
    if not wrong.any():
        return cases
    parts = []
    for check, word in _COLUMN_CHECKS.items():
        names = cases.loc[cases["check"] == check, "failure_case"].tolist()
        if names:
            parts.append(f"{word} column(s) {', '.join(map(repr, names))}")
    parts.append(f"returned columns: {', '.join(repr(str(c)) for c in frame.columns)}")
    one = pd.DataFrame({"column": ["None"], "check": [WRONG_COLUMNS],
                        "failure_case": ["; ".join(parts)], "index": [None]})
    return pd.concat([one, cases[~wrong]], ignore_index=True)


def _bad_rows(cases: pd.DataFrame, rows: pd.Index) -> set[int]:
    if cases["index"].isna().any():
        return set(rows)
    return {int(i) for i in cases["index"]}


def _quarantine(frame: pd.DataFrame, bad: set[int], cases: pd.DataFrame) -> pd.DataFrame:
    if not bad:
        return empty_quarantine()
    positions = sorted(bad)
    rows = frame.loc[positions].to_json(orient="records", lines=True, default_handler=str)
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


def empty_quarantine() -> pd.DataFrame:
    """``quarantined`` of a report without failures: a copy of one frame built once (pandas
    takes ~1.4 ms to build it, ~40 us to copy it; every clean batch needs one)."""
    return _built_empty_quarantine().copy()


def no_cases() -> pd.DataFrame:
    """``failure_cases`` of a report without failures (a copy, as above)."""
    return _built_no_cases().copy()


@functools.cache
def _built_empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in QUARANTINE_COLUMNS},
                        index=pd.Index([], dtype="int64", name="position"))


@functools.cache
def _built_no_cases() -> pd.DataFrame:
    return pd.DataFrame({"column": [], "check": [], "failure_case": [], "index": []})


def failure_sample(cases: pd.DataFrame, limit: int = 5,
                   quarantine: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` failure cases as plain dicts (for errors and metadata); ``row``
    is the row number users look up (None for a failure of the whole frame), and
    ``row_values`` that row as the model returned it (JSON, from ``quarantine``)."""
    rows = ({} if quarantine is None or "position" not in quarantine.columns
            else dict(zip(quarantine["position"], quarantine["row"], strict=True)))
    sample = []
    for c in cases.head(limit).to_dict("records"):
        row = None if pd.isna(c["index"]) else int(c["index"])
        values = _clipped(str(rows[row])) if row in rows else ""
        sample.append({"column": c["column"], "check": c["check"], "value": c["failure_case"],
                       "row": row, "row_values": values})
    return sample


def _clipped(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quarantine_rows(raw: pd.DataFrame | None) -> pd.DataFrame:
    """A stored quarantine (``row`` and ``failures`` as JSON) as users read it: the row's
    values as columns, ``failures`` as a list of dicts, indexed by row number."""
    if raw is None or not len(raw):
        return pd.DataFrame({"failures": pd.Series([], dtype=object)},
                            index=pd.Index([], dtype="int64", name="row"))
    rows = pd.Index(raw["position"].astype("int64"), name="row")
    values = pd.DataFrame([json.loads(r) for r in raw["row"]], index=rows)
    values["failures"] = [json.loads(f) for f in raw["failures"]]
    return values
