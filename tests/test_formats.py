"""formats: no pickle, and the normalisation checkpoints rely on for byte-identical output."""

import numpy as np
import pandas as pd
import pytest

from longrun_dagster import UnsupportedOutput
from longrun_dagster.formats import encode, parquet

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
