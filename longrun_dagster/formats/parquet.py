"""pandas DataFrames <-> Parquet bytes (deterministic for equal frames)."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "parquet"
EXTENSION = "parquet"


def dumps(frame: pd.DataFrame) -> bytes:
    table = pa.Table.from_pandas(frame, preserve_index=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy", write_statistics=True)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def loads(data: bytes) -> pd.DataFrame:
    table = pq.read_table(pa.BufferReader(data))
    frame: pd.DataFrame = table.to_pandas()
    return frame
