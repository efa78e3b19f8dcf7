"""JSON-able records <-> canonical JSON bytes (sorted keys, so equal input, equal bytes)."""

import json
from typing import Any

FORMAT = "json"
EXTENSION = "json"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)
