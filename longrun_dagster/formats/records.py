"""JSON-able records <-> canonical JSON bytes (sorted keys, so equal input, equal bytes)."""

import json
import math
from collections.abc import Iterable
from typing import Any

FORMAT = "json"
EXTENSION = "json"

_HINTS: dict[type[Any], str] = {set: "use a sorted list", frozenset: "use a sorted list",
                                bytes: "use str", bytearray: "use str"}


def dumps(obj: Any) -> bytes:
    """Canonical JSON of ``obj``; ``ValueError`` naming the place in it (``value['a'][0]``)
    that JSON cannot store or would load back as something else (see ``change``)."""
    problem = change(obj)
    if problem is not None:
        raise ValueError(problem)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


def change(value: Any) -> str | None:
    """Where and how ``loads(dumps(value))`` would differ from ``value``, with the fix
    (``"value[2] is a tuple, which JSON would load back as a list; use a list"``), or None
    if it gives it back equal. One walk, which stops at the first problem."""
    found = _change(value, set())
    if found is None:
        return None
    steps, problem = found
    return "value" + "".join(f"[{step!r}]" for step in reversed(steps)) + " " + problem


# Where a problem is (keys and indices, innermost first: built only on the way out of a
# failed walk, so a good value pays for no path) and what it is.
_Found = tuple[list[Any], str]
_PLAIN = {str, int, bool, type(None)}  # exact types: a quick pass over long lists
_STR = {str}


def _change(value: Any, active: set[int]) -> _Found | None:
    if isinstance(value, str | int | None):  # bool is an int
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else \
            ([], f"is {value!r}, which JSON cannot store; use None")
    if isinstance(value, tuple):
        return [], "is a tuple, which JSON would load back as a list; use a list"
    if isinstance(value, dict):
        problem = _key_problem(value)
        return ([], problem) if problem else _children(value, value.items(), active)
    if isinstance(value, list):
        return _children(value, enumerate(value), active)
    hint = _HINTS.get(type(value))
    return [], f"is a {_type_name(value)}, which JSON cannot store" + (
        f"; {hint}" if hint else "")


def _children(value: Any, items: Iterable[tuple[Any, Any]], active: set[int]
              ) -> _Found | None:
    if id(value) in active:  # json.dumps would fail too, without saying where
        return [], "contains itself, which JSON cannot store"
    active.add(id(value))
    for step, item in items:
        kind = type(item)
        if kind in _PLAIN or (kind is float and math.isfinite(item)):
            continue
        found = _change(item, active)
        if found is not None:
            found[0].append(step)
            return found
    active.discard(id(value))
    return None


def _key_problem(keys: Iterable[Any]) -> str | None:
    if _STR.issuperset(map(type, keys)):  # the usual case, without a Python-level loop
        return None
    for key in keys:
        if not isinstance(key, str):
            return _key_change(key)
    return None


def _key_change(key: Any) -> str:
    where = f"has the {_type_name(key)} key {key!r}"
    if isinstance(key, int | float | None):
        return f"{where}, which JSON would load back as the string {json.dumps(key)!r}; " \
            "use str keys"
    return f"{where}, which JSON cannot store; use str keys"


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__qualname__}"
