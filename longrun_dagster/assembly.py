"""A partition's output as Arrow: one table per completed batch, assembled into the output
frame once, over every batch, however they were grouped into checkpoint shards.

Types come from the schema, not from the rows one batch happened to hold: a declared
column is cast to the Arrow type of its pandera dtype in every batch, and the output frame
gets the declared pandas dtype back. An undeclared column (a non-strict schema) keeps what
Arrow infers per batch, and the batches are unified once, over the whole output (``null``
joins anything, ``int64`` and ``double`` give ``double``); the unification is the same
whether the batches are concatenated one by one or shard by shard, so a resumed attempt
commits the bytes of an uninterrupted one by construction.

A batch frame's index is kept when it is not a ``RangeIndex`` (an upstream's ``doc_id``
passed through by the model function): it travels as columns and is the output's index.
"""

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from longrun_dagster.validation import empty_frame

_INDEX = b"longrun/index"
_INDEX_COLUMN = "__index_level_{}__"


class OutputTypes:
    """The Arrow and pandas types a schema declares, and the conversions that apply them."""

    def __init__(self, schema: Any) -> None:
        empty = empty_frame(schema)
        arrow = pa.Schema.from_pandas(empty, preserve_index=False)
        self.arrow = {f.name: f.type for f in arrow if not pa.types.is_null(f.type)}
        self.pandas = {name: empty[name].dtype for name in self.arrow}

    def table(self, frame: pd.DataFrame) -> pa.Table:
        """One batch's frame as a table: declared columns of their declared types."""
        return table_of(frame, self.arrow)

    def frame(self, tables: Sequence[pa.Table]) -> pd.DataFrame:
        """The output frame of every batch's table (or shard of tables), in order."""
        frame = frame_of(tables)
        for name, dtype in self.pandas.items():
            if name in frame.columns and frame[name].dtype != dtype and (
                    isinstance(dtype, pd.api.extensions.ExtensionDtype)
                    or not frame[name].isna().any()):
                frame[name] = frame[name].astype(dtype)
        return frame


def table_of(frame: pd.DataFrame, types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """``frame`` as a table (its index as columns unless a ``RangeIndex``), with ``types``
    applied to the columns named there."""
    names: list[Any] = []
    if isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index(drop=True)
    else:
        names = list(frame.index.names)
        frame = frame.reset_index(
            names=[_INDEX_COLUMN.format(i) for i in range(frame.index.nlevels)])
    table = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    for name, wanted in (types or {}).items():
        where = table.schema.get_field_index(name)
        if where >= 0 and table.schema.field(where).type != wanted:
            table = table.set_column(where, name, table.column(where).cast(wanted))
    return table.replace_schema_metadata({_INDEX: json.dumps(names)})


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    """Tables one after another, their types unified (the empty list: an empty table)."""
    if not tables:
        return pa.table({})
    names = _index_names(tables)
    joined = pa.concat_tables(tables, promote_options="permissive")
    return joined.replace_schema_metadata({_INDEX: json.dumps(names or [])})


def frame_of(tables: Sequence[pa.Table]) -> pd.DataFrame:
    """The frame of tables made by ``table_of`` (or shards of them), index restored."""
    table = concat(tables)
    frame: pd.DataFrame = table.to_pandas()
    names = _index_names(tables)
    if names is not None:
        columns = [_INDEX_COLUMN.format(i) for i in range(len(names))]
        frame = frame.set_index(columns)
        frame.index.names = names
    return frame


def _index_names(tables: Sequence[pa.Table]) -> list[Any] | None:
    """The index names of the first table that has an index (None: no table has one)."""
    for table in tables:
        raw = (table.schema.metadata or {}).get(_INDEX)
        names = json.loads(raw) if raw else []
        if names and _INDEX_COLUMN.format(0) in table.schema.names:
            return list(names)
    return None
