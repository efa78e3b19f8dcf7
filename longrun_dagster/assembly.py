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
passed through by the model function): it travels as columns and is the output's index
(``formats.tables``).
"""

from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from longrun_dagster.formats.tables import concat as concat
from longrun_dagster.formats.tables import frame_of as frame_of
from longrun_dagster.formats.tables import table_of as table_of
from longrun_dagster.formats.tables import with_dtypes
from longrun_dagster.validation import empty_frame


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
        return with_dtypes(frame_of(tables), self.pandas)


