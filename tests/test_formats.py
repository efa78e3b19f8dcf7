"""formats: no pickle, and the normalisation checkpoints rely on for byte-identical output."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longrun_dagster import UnsupportedOutput
from longrun_dagster.formats import decode, encode, parquet

FRAMES = {
    "text and floats": pd.DataFrame({"id": ["a", "b"], "score": [0.1, 0.2]}),
    "embeddings": pd.DataFrame({"id": ["a", "b"],
                                "emb": [np.ones(4, np.float32), np.zeros(4, np.float32)]}),
    "nullable ints": pd.DataFrame({"n": pd.array([1, None], dtype="Int64")}),
    "object ints with None": pd.DataFrame({"n": [1, None]}, dtype=object),
    "bools and times": pd.DataFrame({"ok": [True, False],
                                     "at": pd.to_datetime(["2024-01-01", "2024-01-02"])}),
    "categories": pd.DataFrame({"c": pd.Categorical(["x", "y"])}),
    "empty": pd.DataFrame({"id": pd.Series([], dtype=str)}),
    # over 100 rows a column: dumps converts on pyarrow's threads, normalised on one
    "a batch of embeddings": pd.DataFrame({
        "id": [f"r{i}" for i in range(512)], "n": pd.array(range(512), dtype="Int64"),
        "emb": list(np.random.default_rng(0).random((512, 8), dtype=np.float32))}),
}


@pytest.mark.parametrize("name", list(FRAMES))
def test_normalised_is_what_a_checkpoint_reads_back(name: str) -> None:
    """Fresh batches and batches restored from checkpoint must concatenate identically."""
    frame = FRAMES[name]
    fresh = parquet.normalised(frame)
    restored = parquet.loads(parquet.dumps(frame))
    pd.testing.assert_frame_equal(fresh, restored)
    both = pd.concat([fresh, restored], ignore_index=True)
    assert bytes(parquet.dumps(both)) == bytes(parquet.dumps(
        pd.concat([restored, fresh], ignore_index=True)))


def test_unstorable_objects_are_refused_without_pickle() -> None:
    with pytest.raises(UnsupportedOutput, match="without pickle"):
        encode({"model": object()})


CHANGED_BY_JSON = {
    "int key": ({1: 10, 2: (3, 4)}, r"value has the int key 1, .*the string '1'.*str keys"),
    "tuple": ({"a": [(1, 2)]}, r"value\['a'\]\[0\] is a tuple.*a list.*use a list"),
    "bool key deep": ([1, {"k": {True: 1}}], r"value\[1\]\['k'\] has the bool key True"),
    "None key": ({None: 1}, r"value has the NoneType key None, .*'null'"),
    "tuple key": ({(1, 2): 1}, r"value has the tuple key \(1, 2\), which JSON cannot store"),
    "set": ({"s": {1, 2}}, r"value\['s'\] is a set, which JSON cannot store.*sorted list"),
    "bytes": ({"b": b"x"}, r"value\['b'\] is a bytes, which JSON cannot store"),
    "nan": ({"x": [0.5, float("nan")]}, r"value\['x'\]\[1\] is nan.*None"),
    "inf at the top": (float("inf"), r"value is inf"),
    "numpy int": ({"n": np.int64(3)}, r"value\['n'\] is a numpy.int64, which JSON"),
}


@pytest.mark.parametrize("name", list(CHANGED_BY_JSON))
def test_json_refuses_what_it_would_not_give_back_naming_where(name: str) -> None:
    """A plain asset's {1: 10, 2: (3, 4)} was stored as JSON and loaded back as
    {'1': 10, '2': [3, 4]} without a word: the encoder now refuses what JSON would change
    or cannot store, naming the place inside the value and the fix."""
    value, where = CHANGED_BY_JSON[name]
    with pytest.raises(UnsupportedOutput, match=where) as caught:
        encode(value)
    assert "Return a pandas DataFrame" in str(caught.value)


def test_a_value_that_contains_itself_is_refused_not_a_recursion_error() -> None:
    loop: list[object] = [1]
    loop.append({"again": loop})
    with pytest.raises(UnsupportedOutput, match=r"value\[1\]\['again'\] contains itself"):
        encode(loop)


def test_json_able_values_come_back_equal() -> None:
    value = {"a": [1, 2.5, "x", None, True, {"b": [], "c": {}}], "": -0.0, "n": 2**70}
    encoded = encode(value)
    assert encoded.format == "json"
    assert decode(encoded.format, bytes(encoded.data)) == value
    shared = [1, 2]
    assert decode("json", bytes(encode({"x": shared, "y": shared}).data)) == {
        "x": [1, 2], "y": [1, 2]}


INDEXED = {
    "default range": pd.DataFrame({"x": [1.0, 2.0, 3.0]}),
    "sliced range": pd.DataFrame({"x": range(10)}).iloc[3:7],
    "named stepped range": pd.DataFrame({"x": [1, 2]}, index=pd.RangeIndex(10, 14, 2,
                                                                          name="step")),
    "strings": pd.DataFrame({"x": [1, 2]}, index=pd.Index(["a", "b"], name="id")),
    "shuffled ints": pd.DataFrame({"x": [1, 2, 3]}, index=[7, 3, 5]),
    "dates": pd.DataFrame({"x": [1, 2]}, index=pd.to_datetime(["2024-01-01", "2024-01-02"])),
    "multi": pd.DataFrame({"x": [1, 2]},
                          index=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["k", "n"])),
}


@pytest.mark.parametrize("name", list(INDEXED))
def test_every_index_round_trips_and_bytes_are_deterministic(name: str) -> None:
    """A RangeIndex is now stored as metadata, not a column: any index must still come back
    as it was, and equal frames must still give equal bytes (fingerprints, resume)."""
    frame = INDEXED[name]
    data = parquet.dumps(frame)
    pd.testing.assert_frame_equal(parquet.loads(data), frame)
    pd.testing.assert_frame_equal(parquet.normalised(frame), frame)
    assert bytes(data) == bytes(parquet.dumps(frame.copy()))


def test_a_range_index_is_not_written_as_a_column() -> None:
    """A default RangeIndex cost a whole int64 column to encode, write, hash and decode."""
    data = parquet.dumps(pd.DataFrame({"x": np.arange(1000.0)}))
    assert pq.read_schema(pa.BufferReader(data)).names == ["x"]


@pytest.mark.parametrize("cells", [
    [np.arange(4, dtype=np.float32) + i for i in range(5)],
    [np.arange(3, dtype=np.float64) * i for i in range(5)],
    [np.arange(2, dtype=np.int64) for _ in range(5)],
    [np.arange(2, dtype=np.uint8) for _ in range(5)],
    [np.zeros(0, dtype=np.float32) for _ in range(5)],
    [np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2)],
    [np.zeros(2), None, np.zeros(2), np.zeros(2), np.zeros(2)],
    ["a", "b", "c", "d", "e"],
], ids=["f32", "f64", "i64", "u8", "empty", "ragged", "none", "str"])
def test_a_vector_column_built_from_its_buffer_is_the_table_pyarrow_builds(
        cells: list[object]) -> None:
    """Embedding columns skip pyarrow's per-row conversion (it holds the GIL against the
    model thread); the table, and so the batch's content digest, must be the same."""
    from longrun_dagster.formats import tables

    frame = pd.DataFrame({"id": list("abcde"), "v": cells, "n": np.arange(5)})
    got = tables.table_of(frame)
    want = pa.Table.from_pandas(frame, preserve_index=False, nthreads=1)
    assert got.equals(want.replace_schema_metadata(got.schema.metadata))
    assert tables.digest(got) == tables.digest(want.replace_schema_metadata(
        got.schema.metadata))
