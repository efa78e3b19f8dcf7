"""Objects <-> bytes without pickle: Parquet, safetensors, JSON. No storage here."""

from dataclasses import dataclass
from typing import Any

import pandas as pd

from longrun_dagster.errors import ConfigError, UnsupportedOutput
from longrun_dagster.formats import parquet, records, tables, tensors

NONE_FORMAT = "none"
BATCHES_FORMAT = "parquet-batches"
"""A frame stored as several Parquet objects of a stage's batch tables, in order."""


@dataclass(frozen=True)
class Encoded:
    """An object as bytes: the format to read it back with, a file extension, a row count."""

    format: str
    extension: str
    data: bytes | memoryview
    rows: int | None


def encode(obj: Any) -> Encoded:
    """Encode ``obj``: a DataFrame as Parquet, a dict of tensors/arrays as safetensors,
    JSON-able data as JSON. Anything else, and data JSON would give back changed (int keys,
    tuples), raises ``UnsupportedOutput`` naming the place in it: no pickle."""
    if isinstance(obj, pd.DataFrame):
        return Encoded(parquet.FORMAT, parquet.EXTENSION, parquet.dumps(obj), len(obj))
    if tensors.is_tensor_dict(obj):
        fmt, data = tensors.dumps(obj)
        return Encoded(fmt, tensors.EXTENSION, data, None)
    if obj is None:
        return Encoded(NONE_FORMAT, "none", b"", None)
    try:
        data = records.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise UnsupportedOutput(
            f"cannot store an object of type {type(obj).__qualname__} without pickle: "
            f"{exc}. Return a pandas DataFrame (Parquet), a dict of torch tensors or numpy "
            "arrays (safetensors), or JSON-able data (dicts with str keys, lists, str, "
            "finite numbers, bool, None)"
        ) from exc
    rows = len(obj) if isinstance(obj, list) else None
    return Encoded(records.FORMAT, records.EXTENSION, data, rows)


def format_of(name: str) -> str:
    """The format of an extra object (quarantine...) from its file name's extension."""
    ext = name.rsplit(".", 1)[-1]
    known = {parquet.EXTENSION: parquet.FORMAT, records.EXTENSION: records.FORMAT}
    if ext not in known:
        raise ConfigError(f"cannot tell the format of stored object {name!r}")
    return known[ext]


def decode(format_name: str, data: bytes) -> Any:
    """The object ``encode`` turned into ``data`` with format ``format_name``."""
    if format_name == parquet.FORMAT:
        return parquet.loads(data)
    if format_name in (tensors.FORMAT_TORCH, tensors.FORMAT_NUMPY):
        return tensors.loads(format_name, data)
    if format_name == records.FORMAT:
        return records.loads(data)
    if format_name == NONE_FORMAT:
        return None
    raise ConfigError(
        f"unknown stored format {format_name!r}; this partition was written by a newer "
        "longrun-dagster, upgrade it to read this partition"
    )


def decode_batches(parts: list[Any], dtypes: dict[str, str]) -> pd.DataFrame:
    """The frame of a ``parquet-batches`` partition from its objects' Arrow tables, in
    order: concatenated, its index restored, declared dtypes given back."""
    return tables.with_dtypes(tables.frame_of(parts), tables.dtypes_of(dtypes))
