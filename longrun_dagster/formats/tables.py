"""Arrow tables of a stage's batches <-> frames, and the content digest of a batch.

A batch's output is kept as an Arrow table (``table_of``): its index, unless a
``RangeIndex``, travels as columns and its names as schema metadata. Tables of several
batches are concatenated with their types unified (``concat``), and ``frame_of`` gives
the frame back with its index. ``digest`` is a batch's content identity: the same rows,
types and values give the same digest, however the batches were later grouped into
stored objects. No storage here, no schema.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import blake3
import numpy as np
import pandas as pd
import pyarrow as pa

_INDEX = b"longrun/index"
_INDEX_COLUMN = "__index_level_{}__"


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
    table = _from_pandas(frame)
    for name, wanted in (types or {}).items():
        where = table.schema.get_field_index(name)
        if where >= 0 and table.schema.field(where).type != wanted:
            table = table.set_column(where, name, table.column(where).cast(wanted))
    return table.replace_schema_metadata({_INDEX: json.dumps(names)})


def _from_pandas(frame: pd.DataFrame) -> pa.Table:
    """``pa.Table.from_pandas``, except that a column of equal-length numeric vectors (an
    embedding per row) is built from one stacked numpy buffer: the same Arrow list array,
    without pyarrow's per-row conversion, which holds the GIL against the model thread
    (~1 ms a 256-row batch of 384 floats here; the buffer path ~0.3 ms)."""
    vectors = {name: array for name, column in frame.items()
               if (array := _vector_array(column)) is not None}
    if not vectors or not all(isinstance(name, str) for name in frame.columns):
        return pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    rest = pa.Table.from_pandas(frame.drop(columns=list(vectors)), preserve_index=False,
                                nthreads=1)
    for position, name in enumerate(frame.columns):
        if name in vectors:
            rest = rest.add_column(position, name, vectors[name])
    return rest


def _vector_array(column: pd.Series) -> pa.Array | None:
    """A list array of a column whose cells are 1-d numeric ndarrays of one length and
    dtype (None: any other column, converted by pyarrow as usual)."""
    if column.dtype != object or not len(column):
        return None
    cells = column.to_numpy()
    first = cells[0]
    if type(first) is not np.ndarray or first.ndim != 1 or first.dtype.kind not in "fiu":
        return None
    shape, dtype = first.shape, first.dtype
    if not all(type(v) is np.ndarray and v.shape == shape and v.dtype == dtype
               for v in cells):
        return None
    values = np.concatenate(cells) if shape[0] else np.empty(0, dtype)
    offsets = np.arange(0, (len(cells) + 1) * shape[0], shape[0] or 1, dtype=np.int32)
    if not shape[0]:
        offsets = np.zeros(len(cells) + 1, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


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


def digest(table: pa.Table) -> str:
    """The content digest of one batch's table: BLAKE3 of its Arrow IPC stream (schema,
    metadata and values; deterministic for equal tables)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return blake3.blake3(sink.getvalue()).hexdigest()[:32]


def content_version(digests: Sequence[str]) -> str:
    """The content version of a partition: an ordered digest over its batches' digests
    (so it does not depend on how the batches were grouped into objects)."""
    return blake3.blake3(("batches:" + ",".join(digests)).encode()).hexdigest()[:24]


def with_dtypes(frame: pd.DataFrame, dtypes: Mapping[str, Any]) -> pd.DataFrame:
    """``frame`` with each named column given its declared pandas dtype back (after an
    Arrow round trip): an extension dtype always, a numpy one where no value is missing
    (a missing int stays float, as pandas itself would have it)."""
    for name, dtype in dtypes.items():
        if name in frame.columns and frame[name].dtype != dtype and (
                isinstance(dtype, pd.api.extensions.ExtensionDtype)
                or not frame[name].isna().any()):
            frame[name] = frame[name].astype(dtype)
    return frame


def dtype_names(dtypes: Mapping[str, Any]) -> dict[str, str]:
    """Declared dtypes as names a reader can turn back into dtypes (``dtypes_of``); a
    dtype whose name does not give it back is left out (the reader keeps Arrow's)."""
    names = {}
    for column, dtype in dtypes.items():
        try:
            if pd.api.types.pandas_dtype(str(dtype)) == dtype:
                names[column] = str(dtype)
        except TypeError:
            continue
    return names


def dtypes_of(names: Mapping[str, str]) -> dict[str, Any]:
    found = {}
    for column, name in names.items():
        try:
            found[column] = pd.api.types.pandas_dtype(name)
        except TypeError:
            continue
    return found
