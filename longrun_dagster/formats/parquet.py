"""pandas DataFrames <-> Parquet bytes (deterministic for equal frames)."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "parquet"
EXTENSION = "parquet"


def dumps(frame: pd.DataFrame) -> memoryview:
    """Parquet bytes of ``frame``, written into one buffer sized up front: a growing
    buffer plus a copy to ``bytes`` cost over half of a 256 MiB write (bench/io.py)."""
    table = _table(frame)
    options = {"compression": "snappy", "write_statistics": True,
               "use_dictionary": _dictionary_columns(table.schema)}
    buffer = pa.allocate_buffer(int(table.nbytes * 1.1) + (1 << 20))
    writer = pa.FixedSizeBufferWriter(buffer)
    try:
        pq.write_table(table, writer, **options)
        return memoryview(buffer)[: writer.tell()]
    except (pa.ArrowInvalid, OSError):  # larger than the estimate: let the buffer grow
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        return memoryview(sink.getvalue())


def dumps_table(table: pa.Table) -> memoryview:
    """Parquet bytes of an Arrow table (its types and schema metadata kept)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=True,
                   use_dictionary=_dictionary_columns(table.schema))
    return memoryview(sink.getvalue())


def loads_table(data: bytes | memoryview) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def rows(data: bytes | memoryview) -> int:
    """The number of rows in Parquet bytes (read from the footer only)."""
    return int(pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows)


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Dictionary-encode only text-like columns: on floats (embeddings, scores) pyarrow's
    default tries a dictionary first and writes ~7x slower for nothing (bench/io.py)."""
    return [f.name for f in schema
            if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_binary(f.type) or pa.types.is_dictionary(f.type)]


def loads(data: bytes | memoryview) -> pd.DataFrame:
    return _frame(pq.read_table(pa.BufferReader(data)))


def normalised(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as ``loads(dumps(frame))`` returns it (pandas -> Arrow -> pandas), without
    writing Parquet: what a checkpointed batch reads back as."""
    # One thread: for a batch, pyarrow would otherwise start and join a Python thread pool
    # per call (from_pandas does when rows > 100 x columns), and those threads contend for
    # the GIL with the model's thread. The values, and so the bytes, are the same.
    return _frame(_table(frame, threads=False), threads=False)


def _table(frame: pd.DataFrame, *, threads: bool = True) -> pa.Table:
    # None, not True: a RangeIndex is kept as metadata (start, stop, step, name) instead
    # of a column of int64 written, compressed and read back; any other index is a column.
    return pa.Table.from_pandas(frame, preserve_index=None, nthreads=None if threads else 1)


def _frame(table: pa.Table, *, threads: bool = True) -> pd.DataFrame:
    frame: pd.DataFrame = table.to_pandas(use_threads=threads)
    return frame
