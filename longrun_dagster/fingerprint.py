"""Stage fingerprints: the canonical bytes of everything that changes a committed output.

A committed partition is reused when its fingerprint matches, so the fingerprint must be
the same in every process for the same stage (no ``PYTHONHASHSEED``-dependent set order,
no ``<function at 0x...>``) and must differ whenever the output could differ (arrays by
their full content, floats exactly, the schema, the bad-row budget).

``canonical`` is a tagged, length-prefixed encoding: every value starts with a one-byte
type tag, atoms carry their length and containers their item count, so no encoding is a
prefix of another and two different values never share bytes. Values that compare equal
in the ways a config author means share bytes: ``1 == 1.0``, ``-0.0 == 0.0`` (as Python
says), every NaN, a tuple and the list of its items, dicts and sets in any order.
``True`` is not ``1``. Arrays and tensors are their dtype, shape and bytes, so there
``-0.0`` and ``0.0`` differ.

Bumping ``SCHEME`` changes every fingerprint: every committed partition is recomputed once.
"""

import datetime
import dis
import enum
import functools
import hashlib
import math
import re
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, NewType

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.api.base.model_components import BaseCheckInfo, BaseParserInfo
from pandera.api.function_dispatch import Dispatcher

from longrun_dagster.errors import ConfigError

SCHEME = 1
"""Version of what goes into a stage fingerprint and how it is encoded."""

StageStatic = NewType("StageStatic", str)
"""Digest of the parts of a stage fingerprint known when the stage is declared."""

Input = tuple[str, str | None, str]
"""An input read: (upstream asset key, partition key or None, data version)."""

_REPR_LIMIT = 60


def canonical(value: Any, *, what: str) -> bytes:
    """The canonical bytes of a config-like value; ``what`` names it in errors (``config``).

    Raises ``ConfigError`` naming the place (``config['model']['tokenizer']``) of the first
    value with no canonical bytes: callables, arbitrary objects, DataFrames.
    """
    out: list[bytes] = []
    _encode(value, what, out)
    return b"".join(out)


def digest(value: Any, *, what: str) -> str:
    """SHA-256 hex of ``canonical(value)``."""
    return hashlib.sha256(canonical(value, what=what)).hexdigest()


def stage_static(
    *,
    code_version: str,
    config: Mapping[str, Any],
    schema_description: Mapping[str, Any],
    batch_size: int,
    one_row_per_input: bool,
    max_bad_fraction: float,
) -> StageStatic:
    """Digest of a stage's declaration; call it when the stage is declared, so that a config
    with no canonical bytes is a ``ConfigError`` then, not when a run starts."""
    declared = {
        "scheme": SCHEME, "code_version": code_version, "schema": schema_description,
        "batch_size": batch_size, "one_row_per_input": one_row_per_input,
        "max_bad_fraction": max_bad_fraction,
    }
    h = hashlib.sha256(canonical(declared, what="stage"))
    # encoded on its own so that errors read config['model'], not stage['config']['model']
    h.update(canonical(config, what="config"))
    return StageStatic(h.hexdigest())


def stage_fingerprint_from(static: StageStatic, inputs: Sequence[Input],
                           resources: Mapping[str, Any] | None = None) -> str:
    """The fingerprint of one partition: the declaration plus the inputs read, in order,
    and the public config of the resources the stage uses (a stage that uses none keeps
    the fingerprint it had before resources counted)."""
    body: list[Any] = ["longrun-stage", SCHEME, static, [list(i) for i in inputs]]
    if resources:
        body.append({"resources": dict(resources)})
    return digest(body, what="inputs")


# --- the encoding ------------------------------------------------------------------------


def _atom(tag: bytes, payload: bytes) -> bytes:
    return tag + str(len(payload)).encode() + b":" + payload


def _encode(value: Any, path: str, out: list[bytes]) -> None:
    # bool before int and Enum before int/str: both are subclasses of what follows
    if value is None:
        out.append(b"N")
    elif isinstance(value, bool):
        out.append(b"T" if value else b"F")
    elif isinstance(value, enum.Enum):
        out.append(b"E" + _atom(b"s", type(value).__qualname__.encode()))
        _encode(value.value, f"{path}.value", out)
    elif isinstance(value, int):
        out.append(_atom(b"i", str(int(value)).encode()))
    elif isinstance(value, float):
        out.append(_float(float(value)))
    elif isinstance(value, str):
        out.append(_atom(b"s", value.encode("utf-8", "surrogatepass")))
    elif isinstance(value, (bytes, bytearray)):
        out.append(_atom(b"b", bytes(value)))
    elif isinstance(value, complex):
        out.append(b"c" + _float(value.real) + _float(value.imag))
    elif isinstance(value, (datetime.date, datetime.time, PurePath)):
        out.append(_dated(value))
    elif isinstance(value, Mapping):
        _mapping(value, path, out)
    elif isinstance(value, (list, tuple)):
        out.append(b"l" + str(len(value)).encode() + b":")
        for i, item in enumerate(value):
            _encode(item, f"{path}[{i}]", out)
    elif isinstance(value, (set, frozenset)):
        items = sorted(canonical(item, what=f"{path}{{...}}") for item in value)
        out.append(b"S" + str(len(items)).encode() + b":" + b"".join(items))
    elif isinstance(value, (np.generic, np.ndarray)):
        _numpy(value, path, out)
    elif _is_tensor(value):
        out.append(_tensor(value, path))
    else:
        raise _unencodable(value, path)


def _float(x: float) -> bytes:
    if math.isnan(x):
        return _atom(b"f", b"nan")
    if math.isinf(x):
        return _atom(b"f", b"inf" if x > 0 else b"-inf")
    if x.is_integer():  # 1.0 is 1, and -0.0 is 0
        return _atom(b"i", str(int(x)).encode())
    return _atom(b"f", x.hex().encode())


def _dated(value: datetime.date | datetime.time | PurePath) -> bytes:
    if isinstance(value, PurePath):
        return _atom(b"p", str(value).encode("utf-8", "surrogatepass"))
    if isinstance(value, datetime.datetime):  # before date: it is a subclass
        return _atom(b"t", value.isoformat().encode())
    tag = b"h" if isinstance(value, datetime.time) else b"D"
    return _atom(tag, value.isoformat().encode())


def _mapping(value: Mapping[Any, Any], path: str, out: list[bytes]) -> None:
    pairs = []
    for key, item in value.items():
        short = _short(key)
        encoded_key = canonical(key, what=f"{path}[<key {short}>]")
        pairs.append(encoded_key + canonical(item, what=f"{path}[{short}]"))
    pairs.sort()
    out.append(b"d" + str(len(pairs)).encode() + b":" + b"".join(pairs))


def _numpy(value: np.generic | np.ndarray[Any, Any], path: str, out: list[bytes]) -> None:
    if isinstance(value, np.ndarray):
        out.append(_array(value, path))
        return
    if isinstance(value, (np.datetime64, np.timedelta64)):
        out.append(_atom(b"M", f"{value.dtype.str} {value}".encode()))
        return
    item = value.item()
    if isinstance(item, np.generic):  # longdouble and such: no Python equivalent
        out.append(_array(np.asarray(value), path))
    else:
        _encode(item, path, out)


def _array(array: np.ndarray[Any, Any], path: str) -> bytes:
    if array.dtype == np.dtype(object):
        return b"O" + canonical(list(array.shape), what=path) + canonical(
            array.tolist(), what=path)
    if array.dtype.hasobject:
        raise _unencodable(array, path)
    little = array.dtype.newbyteorder("<")
    array = np.ascontiguousarray(array, dtype=little)
    content = hashlib.sha256(array.reshape(-1).view(np.uint8).data).digest()
    return (b"a" + _atom(b"s", str(array.dtype.descr).encode())
            + canonical(list(array.shape), what=path) + _atom(b"b", content))


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # never import it: most stages that don't use it
    return torch is not None and isinstance(value, torch.Tensor)


def _tensor(tensor: Any, path: str) -> bytes:
    torch = sys.modules["torch"]
    if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
        raise _unencodable(tensor, path)
    plain = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    flat = plain.reshape(-1).view(torch.uint8)
    content = hashlib.sha256(flat.numpy().data).digest()
    return (b"x" + _atom(b"s", str(tensor.dtype).encode())
            + canonical(list(tensor.shape), what=path) + _atom(b"b", content))


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _unencodable(value: Any, where: str) -> ConfigError:
    if where.startswith("schema"):
        fix = "give the schema plain values there (numbers, strings, lists, None)"
    elif callable(value):
        fix = ("put a name or version string in config instead, e.g. "
               "{'postprocess': 'strip_html-v2'}, and bump code_version when its code changes")
    elif hasattr(value, "shape") and hasattr(value, "columns"):
        fix = ("put a name or version string in config instead, e.g. "
               "{'labels': 'labels-2024-06-01'}, or read the data as an upstream asset")
    else:
        fix = ("put a name or version string in config instead, e.g. "
               "{'tokenizer': 'bert-base-uncased@v2'} rather than the tokenizer object")
    return ConfigError(
        f"{where} ({_short(value)}) is of type {_type_name(type(value))}, which has no "
        f"canonical bytes: the stage's fingerprint would differ in every process or miss a "
        f"change; {fix}"
    )


def _encodes(value: Any) -> bool:
    if isinstance(value, (types.ModuleType, type)) or callable(value):
        return False
    try:
        canonical(value, what="value")
    except ConfigError:
        return False
    return True


# --- schemas -----------------------------------------------------------------------------


def describe_schema(schema: pa.DataFrameSchema) -> dict[str, Any]:
    """Everything in ``schema`` that changes which rows pass and how they are written, as
    canonical-encodable plain values; not its name, title, description or metadata.

    Builtin checks are described by their bound values (``ge(0)`` vs ``ge(1)``); a custom
    check by its function's qualname, a hash of its code, its defaults, the values it
    closes over and the module-level values it reads; a bound method, callable object or
    ``functools.partial`` also by the state it is bound to (``Between(0, 1).check``: the
    class and its attributes). A ``DataFrameModel`` and the
    ``DataFrameSchema`` it is equivalent to describe the same (builtin checks only: a
    model's custom check is a method and a schema's a separate function). Raises
    ``ConfigError`` when a check refers to a value with no canonical bytes, captured,
    bound or global.
    """
    description = {
        **_frame(schema),
        "dtype": _dtype(schema.dtype),
        "add_missing_columns": schema.add_missing_columns,
        "report_duplicates": schema.report_duplicates,
        "unique_column_names": schema.unique_column_names,
        "drop_invalid_rows": schema.drop_invalid_rows,
        "checks": [_check(c, f"schema check {c.name!r}") for c in schema.checks],
        "parsers": [_parser(p, f"schema parser {p.name!r}") for p in schema.parsers],
        "index": _index(schema.index),
        "columns": {name: _column(column, f"schema column {name!r}")
                    for name, column in schema.columns.items()},
        # with ordered=True or add_missing_columns the order matters
        "column_order": list(schema.columns),
    }
    canonical(description, what="schema")  # fail here, naming the place, not at run time
    return description


def _frame(schema: pa.DataFrameSchema) -> dict[str, Any]:
    unique = schema.unique
    return {"strict": schema.strict, "ordered": schema.ordered, "coerce": schema.coerce,
            "unique": list(unique) if unique is not None else None}


def _column(column: Any, where: str) -> dict[str, Any]:
    return {
        **_component(column, where),
        "required": column.required,
        "regex": column.regex,
        "default": _plain(column.default),
        "drop_invalid_rows": column.drop_invalid_rows,
    }


def _component(component: Any, where: str) -> dict[str, Any]:
    """What a column and an index have in common."""
    return {
        "name": component.name,
        "dtype": _dtype(component.dtype),
        "nullable": component.nullable,
        "unique": component.unique,
        "report_duplicates": component.report_duplicates,
        "coerce": component.coerce,
        "checks": [_check(c, f"{where} check {c.name!r}") for c in component.checks],
        "parsers": [_parser(p, f"{where} parser {p.name!r}") for p in component.parsers],
    }


def _index(index: Any) -> dict[str, Any] | None:
    if index is None:
        return None
    if isinstance(index, pa.MultiIndex):
        return {**_frame(index), "levels": [
            _component(level, f"schema index level {level.name!r}") for level in index.indexes
        ]}
    return _component(index, f"schema index {index.name!r}")


def _dtype(dtype: Any) -> dict[str, Any] | None:
    """``str(dtype)`` plus the dtype's parameters (a category's categories, a datetime's
    ``to_datetime_kwargs``) that its name leaves out."""
    if dtype is None:
        return None
    fields = getattr(dtype, "__dataclass_fields__", {})
    params = {}
    for name in sorted(fields):
        if name.startswith("_") or name == "type":
            continue
        value = _plain(getattr(dtype, name))
        params[name] = value if _encodes(value) else _stable_str(value)
    return {"name": str(dtype), "params": params}


def _stable_str(value: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(value))


def _check(check: pa.Check, where: str) -> dict[str, Any]:
    groupby = check.groupby
    description = {
        "kind": type(check).__qualname__,
        "name": check.name,
        "fn": _callable(check._check_fn, where, ()),
        "statistics": {k: _plain(v) for k, v in (check.statistics or {}).items()},
        "element_wise": check.element_wise,
        "ignore_na": check.ignore_na,
        "raise_warning": check.raise_warning,
        "n_failure_cases": check.n_failure_cases,
        "groupby": _callable(groupby, where, ()) if callable(groupby) else groupby,
        "groups": check.groups,
        "error": _error(check, where),
    }
    if isinstance(check, pa.Hypothesis):
        relationship = check.relationship
        description["hypothesis"] = {
            "relationship": (_callable(relationship, where, ()) if callable(relationship)
                             else relationship),
            "relationship_kwargs": _plain(check.relationship_kwargs),
            "samples": check.samples,
        }
    return description


def _error(check: pa.Check, where: str) -> Any:
    """A builtin check's own message is left out: it is the statistics again, and prints a
    set in hash order, which differs from process to process."""
    error = check.error
    if callable(error):
        return _callable(error, where, ())
    fn = check._check_fn
    if error is None or not isinstance(fn, Dispatcher):
        return error
    try:
        default = getattr(pa.Check, fn.__name__)(**(check.statistics or {})).error
    except (AttributeError, TypeError, ValueError, pa.errors.SchemaInitError):
        return error  # statistics that don't rebuild the check: keep the message
    return {"builtin_default": None} if error == default else error


def _parser(parser: Any, where: str) -> dict[str, Any]:
    return {
        "name": parser.name,
        "fn": _callable(parser._parser_fn, where, ()),
        "kwargs": {k: _plain(v) for k, v in parser._parser_kwargs.items()},
        "element_wise": parser.element_wise,
        "ignore_na": parser.ignore_na,
    }


def _plain(value: Any) -> Any:
    """Check statistics as plain values: a compiled regex as its pattern and flags."""
    if value is pd.NA:  # a nullable column's default
        return {"pandas": "NA"}
    if isinstance(value, re.Pattern):
        return {"regex": value.pattern, "flags": int(value.flags)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- functions in checks: the same code gives the same description in every process -----


def _callable(fn: Any, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    if isinstance(fn, Dispatcher):
        return {"builtin_check": fn.__name__}
    if isinstance(fn, functools.partial):
        return {"partial": _callable(fn.func, where, stack),
                "args": [_captured(a, f"{where} argument", stack) for a in fn.args],
                "keywords": {k: _captured(v, f"{where} argument {k!r}", stack)
                             for k, v in fn.keywords.items()}}
    if isinstance(fn, (classmethod, staticmethod)):
        return _callable(fn.__func__, where, stack)
    if isinstance(fn, types.MethodType):
        owner = fn.__self__
        method = _callable(fn.__func__, where, stack)
        if isinstance(owner, type):  # a classmethod, a DataFrameModel's check
            return {"method": method, "of": _type_name(owner)}
        return {"method": method, "of": _type_name(type(owner)),
                "self": _instance(owner, where, stack)}
    if isinstance(fn, types.FunctionType):
        return _function(fn, where, stack)
    if isinstance(fn, type):
        return {"class": _type_name(fn)}
    if isinstance(fn, (types.BuiltinFunctionType, np.ufunc)):
        module = getattr(fn, "__module__", None) or "builtins"
        builtin = {"builtin": f"{module}.{fn.__name__}"}
        owner = getattr(fn, "__self__", None)  # frozenset({...}).__contains__: the set
        if owner is None or isinstance(owner, (types.ModuleType, type)):
            return builtin
        return {**builtin, "self": _instance(owner, where, stack)}
    call = _python_call(fn)
    if call is not None:
        return {"call": _function(call, where, stack),
                "of": _type_name(type(fn)), "self": _instance(fn, where, stack)}
    raise ConfigError(
        f"{where} calls {_short(fn)} of type {_type_name(type(fn))}, which has no canonical "
        f"description, so the stage's fingerprint could not tell when it changes; use a "
        f"plain function or lambda there"
    )


def _function(fn: types.FunctionType, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    if id(fn) in stack:
        return {"recursive": fn.__qualname__}
    stack = (*stack, id(fn))
    code = fn.__code__
    cells = zip(code.co_freevars, fn.__closure__ or (), strict=True)
    return {
        "function": fn.__qualname__,
        "code": digest(_code(code), what="code"),
        "defaults": [_captured(v, f"{where} default", stack) for v in fn.__defaults__ or ()],
        "kwdefaults": {k: _captured(v, f"{where} default {k!r}", stack)
                       for k, v in (fn.__kwdefaults__ or {}).items()},
        "closure": {name: _cell(cell, f"{where} variable {name!r}", stack)
                    for name, cell in cells},
        "globals": _globals(fn, where, stack),
    }


def _globals(fn: types.FunctionType, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    """The module-level values ``fn`` names, by the rules for captured values; modules,
    classes, functions and builtins are left out (their code is not described)."""
    code = fn.__code__
    read = _global_reads(code)
    described: dict[str, Any] = {}
    for name in sorted(_names(code)):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if _encodes(value):  # any name, as before: an attribute's namesake too
            described[name] = value
        elif name not in read or isinstance(value, types.ModuleType):
            continue  # df.LABELS reads a column, not the global LABELS
        elif _is_bound_to_state(value):
            described[name] = _captured(value, f"{where} global {name!r}", stack)
        elif not callable(value):
            raise _no_bytes(value, f"{where} global {name!r}", _GLOBAL_FIX)
    return described


def _global_reads(code: types.CodeType) -> set[str]:
    """The names ``code`` reads as globals; ``co_names`` also holds attribute names."""
    reads = {i.argval for i in dis.get_instructions(code)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            reads |= _global_reads(const)
    return reads


def _code(code: types.CodeType) -> dict[str, Any]:
    """Bytecode, constants and names: not line numbers, so moving a lambda is no change."""
    return {"co_code": code.co_code, "co_consts": [_const(c) for c in code.co_consts],
            "co_names": list(code.co_names)}


def _const(const: Any) -> Any:
    if isinstance(const, types.CodeType):
        return _code(const)
    if isinstance(const, tuple):
        return [_const(c) for c in const]
    if const is Ellipsis:
        return {"ellipsis": None}
    # the compiler keeps 1 and 1.0 (and 0.0 and -0.0) apart: `x // 1.0` is a float
    if isinstance(const, float):
        return {"float": const.hex()}
    if isinstance(const, complex):
        return {"complex": [const.real.hex(), const.imag.hex()]}
    return const


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _cell(cell: types.CellType, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    try:
        contents = cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return {"empty": None}
    return _captured(contents, where, stack)


def _captured(value: Any, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    """A value a check function closes over or is bound to, tagged by kind."""
    if isinstance(value, BaseCheckInfo):  # a DataFrameModel's @pa.check method
        return {"check_info": _callable(value.check_fn, where, stack),
                "kwargs": {k: _plain(v) for k, v in value.check_kwargs.items()}}
    if isinstance(value, BaseParserInfo):
        return {"parser_info": _callable(value.parser_fn, where, stack),
                "kwargs": {k: _plain(v) for k, v in value.parser_kwargs.items()}}
    if isinstance(value, types.ModuleType):
        return {"module": value.__name__}
    if isinstance(value, re.Pattern):
        return {"value": _plain(value)}
    if callable(value) and not isinstance(value, enum.Enum):
        return {"callable": _callable(value, where, stack)}
    if _encodes(value):
        return {"value": value}
    raise _no_bytes(value, where, _PLAIN_FIX)


_PLAIN_FIX = ("give the check plain values (numbers, strings, tuples, lists, frozensets) or "
              "name or version strings")
_GLOBAL_FIX = ("make the global a plain value (a tuple, list or frozenset of numbers or "
               "strings) and build anything else from it inside the check")


def _no_bytes(value: Any, where: str, fix: str) -> ConfigError:
    return ConfigError(
        f"{where} refers to {_short(value)} of type {_type_name(type(value))}, which has no "
        f"canonical bytes, so the stage's fingerprint could not tell when it changes; {fix}"
    )


# --- objects checks are bound to: Between(0, 1).check is its code and its bounds ---------


def _python_call(value: Any) -> types.FunctionType | None:
    """The Python ``__call__`` of an instance such as ``Between(0, 1)``, else None."""
    if isinstance(value, type):
        return None
    call = None
    for klass in type(value).__mro__:
        call = klass.__dict__.get("__call__")
        if call is not None:
            break
    return call if isinstance(call, types.FunctionType) else None


def _is_bound_to_state(value: Any) -> bool:
    """A callable whose behaviour depends on more than its code: a bound method of an
    instance, a partial or a callable object."""
    if isinstance(value, types.MethodType):
        return not isinstance(value.__self__, type)
    return isinstance(value, functools.partial) or _python_call(value) is not None


def _instance(owner: Any, where: str, stack: tuple[int, ...]) -> dict[str, Any]:
    """The object a check is bound to: its class, its attributes (by the rules for
    captured values) and, for a subclass of a builtin such as a NamedTuple, its value."""
    cls = type(owner)
    if id(owner) in stack:  # an attribute holding the object's own method
        return {"recursive": _type_name(cls)}
    stack = (*stack, id(owner))
    attributes = _attributes(owner)
    holds_a_value = any(c.__module__ == "builtins" for c in cls.__mro__[:-1])
    if attributes is None and not holds_a_value:
        raise ConfigError(
            f"{where} is bound to {_short(owner)} of type {_type_name(cls)}, whose state "
            f"Python cannot read (no __dict__ or __slots__), so the stage's fingerprint "
            f"could not tell when it changes; use a plain function, or a class of your own "
            f"with plain attributes")
    described: dict[str, Any] = {"class": _type_name(cls), "attributes": {
        name: _captured(value, f"{where} {cls.__qualname__} attribute {name!r}", stack)
        for name, value in (attributes or {}).items()}}
    if holds_a_value:
        try:
            canonical(owner, what=where)
        except ConfigError:
            raise _no_bytes(owner, f"{where} bound object", _PLAIN_FIX) from None
        described["value"] = owner
    return described


def _attributes(owner: Any) -> dict[str, Any] | None:
    """An object's ``__dict__`` and the ``__slots__`` of its classes; None when it has
    neither (a C object, whose state Python cannot read)."""
    found = dict(vars(owner)) if isinstance(getattr(owner, "__dict__", None), dict) else None
    for cls in type(owner).__mro__:
        slots = cls.__dict__.get("__slots__")
        if slots is None:
            continue
        found = {} if found is None else found
        for slot in [slots] if isinstance(slots, str) else slots:
            name = _unmangled(cls, slot)
            if slot not in ("__dict__", "__weakref__") and hasattr(owner, name):
                found[name] = getattr(owner, name)
    return found


def _unmangled(cls: type, slot: str) -> str:
    """The attribute a slot is stored under: ``__hi`` in ``class Between`` is ``_Between__hi``."""
    if slot.startswith("__") and not slot.endswith("__"):
        return f"_{cls.__name__.lstrip('_')}{slot}"
    return slot



# --- a stage's code: the default code_version --------------------------------------------


def code_identity(*fns: Any) -> str:
    """The default ``code_version`` of a stage: a digest of its functions' code (bytecode,
    constants, names, nested functions and lambdas), their defaults and closures, the
    constant module globals they read, and the code of the functions of their own module
    that they call, recursively. Not seen: functions imported from other modules, mutable
    globals (a list, a dict: they change as the code runs), and objects' state."""
    seen: set[int] = set()
    body = [_code_of(fn, getattr(fn, "__module__", None), seen) for fn in fns if fn]
    return digest(["code", sys.version_info[:2], body], what="code")


def _code_of(fn: Any, module: str | None, seen: set[int]) -> Any:
    if isinstance(fn, functools.partial):
        return {"partial": _code_of(fn.func, module, seen),
                "args": [_constant_or_code(a, module, seen) for a in fn.args],
                "keywords": {k: _constant_or_code(v, module, seen)
                             for k, v in fn.keywords.items()}}
    if isinstance(fn, (classmethod, staticmethod, types.MethodType)):
        return {"method": _code_of(fn.__func__, module, seen)}
    if not isinstance(fn, types.FunctionType):
        call = _python_call(fn)
        return ({"call": _code_of(call, module, seen), "of": _type_name(type(fn))}
                if call is not None else {"opaque": _type_name(type(fn))})
    if id(fn) in seen:
        return {"recursive": fn.__qualname__}
    seen.add(id(fn))
    code = fn.__code__
    cells = zip(code.co_freevars, fn.__closure__ or (), strict=True)
    return {
        "function": fn.__qualname__,
        "code": _code(code),
        "defaults": [_constant_or_code(v, module, seen) for v in fn.__defaults__ or ()],
        "kwdefaults": {k: _constant_or_code(v, module, seen)
                       for k, v in (fn.__kwdefaults__ or {}).items()},
        "closure": {name: _constant_or_code(_contents(cell), module, seen)
                    for name, cell in cells},
        "globals": {name: _constant_or_code(fn.__globals__[name], module, seen)
                    for name in sorted(_global_reads(code)) if name in fn.__globals__},
    }


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return None


def _constant_or_code(value: Any, module: str | None, seen: set[int]) -> Any:
    """A constant as itself; a function of the stage's own module as its code; anything
    else by its type only (not seen)."""
    if _is_constant(value):
        return {"constant": _const(value) if not isinstance(value, frozenset)
                else sorted(map(repr, value))}
    if isinstance(value, types.FunctionType) and value.__module__ == module:
        return _code_of(value, module, seen)
    if isinstance(value, types.ModuleType):
        return {"module": value.__name__}
    if isinstance(value, type) or callable(value):
        name = getattr(value, "__qualname__", None) or _type_name(type(value))
        return {"callable": f"{getattr(value, '__module__', '')}.{name}"}
    return {"opaque": _type_name(type(value))}


def _is_constant(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum)):
        return True
    return isinstance(value, (tuple, frozenset)) and all(_is_constant(v) for v in value)
