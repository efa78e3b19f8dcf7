"""Fingerprints: canonical bytes of config, schema and inputs, the same in every process."""

import datetime
import enum
import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import dagster as dg
import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pandera.typing import Series

from longrun_dagster import AtomicObjectStoreIOManager, StageContext, model_stage
from longrun_dagster.errors import ConfigError
from longrun_dagster.fingerprint import (
    canonical,
    describe_schema,
    digest,
    stage_fingerprint_from,
    stage_static,
)


def same(a: Any, b: Any) -> bool:
    return canonical(a, what="config") == canonical(b, what="config")


# --- values ------------------------------------------------------------------------------


def test_arrays_differing_in_the_middle_differ() -> None:
    """str() of an array over 1000 items elides its middle ('...'), so two arrays that
    differ there gave one fingerprint."""
    a = np.zeros(5000)
    b = a.copy()
    b[2500] = 1.0
    assert str(a) == str(b)
    assert not same(a, b)


def test_arrays_differing_beyond_8_digits_differ() -> None:
    """str() prints 8 significant digits, so 0.1 and 0.1 + 1e-12 gave one fingerprint."""
    a = np.array([0.1, 0.2])
    b = np.array([0.1 + 1e-12, 0.2])
    assert str(a) == str(b)
    assert not same(a, b)


def test_arrays_by_dtype_shape_and_content() -> None:
    a = np.arange(6, dtype=np.int64)
    assert same(a, a.copy())
    assert same(a[::2], np.array([0, 2, 4]))  # strided views hash their items, not memory
    assert same(a.astype(">i8"), a)  # byte order is not content
    assert not same(a, a.astype(np.int32))
    assert not same(a, a.reshape(2, 3))
    assert not same(a, a.tolist())
    assert same(np.array(["x", None], dtype=object), np.array(["x", None], dtype=object))
    assert not same(np.array(["x", None], dtype=object), np.array(["y", None], dtype=object))


def test_tensors_by_dtype_shape_and_content() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(3000, dtype=torch.bfloat16)
    u = t.clone()
    u[1500] = 1.0
    assert same(t, t.clone()) and not same(t, u)
    assert not same(t, t.to(torch.float32))
    assert not same(t, t.reshape(3, 1000))
    assert same(torch.arange(6)[::2], torch.tensor([0, 2, 4]))


def test_numbers() -> None:
    assert same(1, 1.0) and same({"lr": 1}, {"lr": 1.0})
    assert not same(True, 1) and not same(False, 0)
    assert not same("1", 1) and not same(["1"], "1") and not same([1], 1)
    assert not same(0.1 + 0.2, 0.3)  # they differ in the 17th digit
    assert same(-0.0, 0.0) and same(-0.0, 0)  # -0.0 == 0.0, as Python says
    assert same(float("nan"), math.nan) and not same(math.nan, 0)
    assert not same(math.inf, -math.inf) and not same(math.inf, "inf")
    assert same(10**30, 1e30) is (10**30 == 1e30)
    assert same(2**70, float(2**70))


def test_containers() -> None:
    assert same((1, "a"), [1, "a"])
    assert not same([1, 2], [2, 1])
    assert same({"b": 1, "a": 2}, {"a": 2, "b": 1})
    assert not same({1: "x"}, {"1": "x"})
    assert not same({"a": 1}, [["a", 1]])
    assert same({3, 1, 2}, frozenset([2, 3, 1]))
    assert not same({1, 2}, [1, 2])
    assert not same(None, "None") and not same(None, []) and not same("", [])
    assert not same(["ab"], ["a", "b"]) and not same(["a", ""], ["", "a"])


class Precision(enum.Enum):
    BF16 = "bf16"
    FP32 = "fp32"


def test_numpy_scalars_dates_enums_and_paths() -> None:
    assert same(np.int64(3), 3) and same(np.float32(0.5), 0.5) and same(np.bool_(True), True)
    assert not same(np.float32(0.1), 0.1)  # float32(0.1) is a different number
    assert not same(datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2))
    assert not same(datetime.date(2024, 1, 2), "2024-01-02")
    assert same(Precision.BF16, Precision("bf16"))
    assert not same(Precision.BF16, "bf16") and not same(Precision.BF16, Precision.FP32)
    assert same(Path("/data/x"), PurePosixPath("/data/x"))
    assert not same(Path("/data/x"), "/data/x")


@pytest.mark.parametrize("value, kind", [
    (lambda s: s, "function"), (print, "builtin_function_or_method"),
    (object(), "object"), (pd.DataFrame({"a": [1]}), "pandas.DataFrame"),
])
def test_callables_and_objects_in_config_name_the_path(value: Any, kind: str) -> None:
    """A callable in config fingerprinted as '<function <lambda> at 0x7f..>': a new
    fingerprint in every process, so committed work was never reused."""
    config = {"model": {"tokenizer": value}, "lr": 0.1}
    with pytest.raises(ConfigError) as caught:
        stage_static(code_version="1", config=config, schema_description={},
                     batch_size=8, one_row_per_input=True, max_bad_fraction=0.0)
    message = str(caught.value)
    assert message.startswith("config['model']['tokenizer'] (")
    assert f"is of type {kind}, which has no canonical bytes" in message
    assert "name or version string" in message


def test_path_names_list_items_and_set_elements() -> None:
    with pytest.raises(ConfigError, match=r"^config\['steps'\]\[1\] \(<function"):
        canonical({"steps": ["a", lambda: 0, "b"]}, what="config")
    with pytest.raises(ConfigError, match=r"^config\['tags'\]\{\.\.\.\} \(<enum 'Precision'>\)"):
        canonical({"tags": {"a", Precision}}, what="config")


SCRIPT = textwrap.dedent("""
    import pandera.pandas as pa
    from longrun_dagster.fingerprint import describe_schema, digest
    config = {
        "labels": {"spam", "ham", "eggs", "bacon", "toast", "jam", "tea", "beans"},
        "frozen": frozenset({("a", 1), ("b", 2), ("c", 3)}),
        "weights": dict(zip(["z", "y", "x", "w"], [1, 2, 3, 4])),
        "reversed": dict(zip(["w", "x", "y", "z"], [4, 3, 2, 1])),
        "mixed_keys": {1: "one", "1": "string one", (1, 2): "pair"},
    }
    schema = pa.DataFrameSchema({
        "label": pa.Column(str, [pa.Check.isin({"spam", "ham", "eggs"}),
                                 pa.Check(lambda s: s.isin({"spam", "ham", "eggs"}))]),
    })
    print(digest(config, what="config"), digest(describe_schema(schema), what="schema"))
""")


def test_sets_and_dict_order_give_one_fingerprint_in_every_process() -> None:
    """json.dumps(default=str) wrote sets in hash order, which PYTHONHASHSEED changes per
    process: the same config had a new fingerprint in every run."""
    runs = [subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONHASHSEED": seed}, text=True)
            for seed in ("1", "2", "3")]
    outputs = {run.communicate(timeout=120)[0] for run in runs}
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert len(outputs) == 1


# --- schemas -----------------------------------------------------------------------------


def scores(*, ge: float = 0, dtype: Any = float, nullable: bool = False,
           extra: bool = False, check: Any = None) -> pa.DataFrameSchema:
    columns = {
        "id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "score": pa.Column(dtype, [pa.Check.ge(ge), pa.Check.le(1)], nullable=nullable),
        "label": pa.Column(str, check or pa.Check(lambda s: s.str.len() < 10)),
    }
    if extra:
        columns["note"] = pa.Column(str, required=False)
    return pa.DataFrameSchema(columns, strict=True)


def described(schema: pa.DataFrameSchema) -> str:
    return digest(describe_schema(schema), what="schema")


def test_same_schema_built_twice_is_described_the_same() -> None:
    assert described(scores()) == described(scores())


@pytest.mark.parametrize("changed", [
    {"ge": 1}, {"dtype": "float32"}, {"nullable": True}, {"extra": True},
    {"check": pa.Check(lambda s: s.str.len() < 11)},
    {"check": pa.Check(lambda s: s.str.len() <= 10)},
    {"check": pa.Check(lambda s: s.str.len() < 10, element_wise=False, ignore_na=False)},
    {"check": pa.Check(lambda s: s.str.len() < 10, raise_warning=True)},
])
def test_changing_the_schema_changes_its_description(changed: dict[str, Any]) -> None:
    """The fingerprint left the schema out: tightening ge=0 to ge=1 reused output that the
    new schema would have quarantined."""
    assert described(scores(**changed)) != described(scores())


def test_schema_level_settings_change_the_description() -> None:
    base = pa.DataFrameSchema({"x": pa.Column(int)})
    variants = [
        pa.DataFrameSchema({"x": pa.Column(int)}, strict="filter"),
        pa.DataFrameSchema({"x": pa.Column(int)}, ordered=True),
        pa.DataFrameSchema({"x": pa.Column(int)}, coerce=True),
        pa.DataFrameSchema({"x": pa.Column(int)}, unique=["x"]),
        pa.DataFrameSchema({"x": pa.Column(int)}, add_missing_columns=True),
        pa.DataFrameSchema({"x": pa.Column(int)}, checks=pa.Check(lambda df: df.x > 0)),
        pa.DataFrameSchema({"x": pa.Column(int)}, index=pa.Index(int, pa.Check.ge(0))),
        pa.DataFrameSchema({"x": pa.Column(int, default=0)}),
        pa.DataFrameSchema({"x": pa.Column(int, coerce=True)}),
        pa.DataFrameSchema({"x": pa.Column(int, required=False)}),
        pa.DataFrameSchema({"x": pa.Column(int, pa.Check.isin([1, 2]))}),
        pa.DataFrameSchema({"x": pa.Column(int, pa.Check.isin([1, 3]))}),
        pa.DataFrameSchema({"x": pa.Column(int, pa.Check.ge(0, n_failure_cases=5))}),
        pa.DataFrameSchema({"x": pa.Column(int, pa.Check.ge(0, error="negative"))}),
    ]
    descriptions = {described(s) for s in [base, *variants]}
    assert len(descriptions) == len(variants) + 1
    grouped = [pa.DataFrameSchema({"x": pa.Column(int, check), "y": pa.Column(str)})
               for check in (pa.Check.ge(0), pa.Check.ge(0, groupby="y"))]
    assert described(grouped[0]) != described(grouped[1])


def test_a_builtin_checks_own_message_is_left_out_but_a_custom_one_is_not() -> None:
    """isin's default message prints its set in hash order, which differs per process."""
    def labels(check: pa.Check) -> pa.DataFrameSchema:
        return pa.DataFrameSchema({"label": pa.Column(str, check)})

    assert described(labels(pa.Check.ge(0))) == described(labels(pa.Check.ge(0.0)))
    assert described(labels(pa.Check.ge(0))) != described(labels(pa.Check.ge(0, error="neg")))


def test_multiindex_levels_and_categories_are_described() -> None:
    def frame(level_dtype: Any, categories: list[str]) -> pa.DataFrameSchema:
        index = pa.MultiIndex([pa.Index(str, name="doc"), pa.Index(level_dtype, name="chunk")])
        return pa.DataFrameSchema(
            {"kind": pa.Column(pd.CategoricalDtype(categories))}, index=index)

    base = described(frame(int, ["a", "b"]))
    assert base == described(frame(int, ["a", "b"]))
    assert base != described(frame(float, ["a", "b"]))
    assert base != described(frame(int, ["a", "c"]))


def test_a_check_closing_over_a_value_changes_with_the_value() -> None:
    def longer_than(n: int) -> pa.Check:
        return pa.Check(lambda s: s.str.len() > n)

    assert described(scores(check=longer_than(3))) == described(scores(check=longer_than(3)))
    assert described(scores(check=longer_than(3))) != described(scores(check=longer_than(4)))


def test_an_unencodable_default_is_a_config_error_naming_the_column() -> None:
    with pytest.raises(ConfigError, match=r"^schema\['columns'\]\['x'\]\['default'\] "):
        describe_schema(pa.DataFrameSchema({"x": pa.Column(str, default=object())}))


def test_column_order_is_described() -> None:
    a, b = pa.Column(int), pa.Column(str)
    assert described(pa.DataFrameSchema({"a": a, "b": b})) \
        != described(pa.DataFrameSchema({"b": b, "a": a}))


def test_a_check_closing_over_an_object_is_a_config_error() -> None:
    model = object()
    check = pa.Check(lambda s: s.map(lambda v: v is model), name="is_model")
    with pytest.raises(ConfigError, match="schema column 'label' check 'is_model' variable"):
        describe_schema(scores(check=check))


class ScoreModel(pa.DataFrameModel):
    id: Series[str] = pa.Field(str_length={"min_value": 1}, unique=True)
    score: Series[float] = pa.Field(ge=0, le=1)
    label: Series[str] = pa.Field(isin=["low", "high"])

    class Config:
        strict = True


def test_a_model_and_its_equivalent_schema_are_described_the_same() -> None:
    """Decision: the description is what validation does, not how the schema was written,
    so a DataFrameModel and the DataFrameSchema with the same builtin checks are equal."""
    schema = pa.DataFrameSchema({
        "id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "score": pa.Column(float, [pa.Check.ge(0), pa.Check.le(1)]),
        "label": pa.Column(str, pa.Check.isin(["low", "high"])),
    }, strict=True)
    assert describe_schema(ScoreModel.to_schema()) == describe_schema(schema)


def test_model_custom_checks_are_described_by_their_code() -> None:
    """pandera wraps every @pa.check method in one adapter function, so its code alone
    would describe every model check the same."""
    def model(threshold: int) -> type[pa.DataFrameModel]:
        class Labels(pa.DataFrameModel):
            label: Series[str]

            @pa.check("label")
            def short(cls, s: pd.Series) -> pd.Series:
                return s.str.len() < threshold

        return Labels

    def model_le(threshold: int) -> type[pa.DataFrameModel]:
        class Labels(pa.DataFrameModel):
            label: Series[str]

            @pa.check("label")
            def short(cls, s: pd.Series) -> pd.Series:
                return s.str.len() <= threshold

        return Labels

    assert described(model(10).to_schema()) == described(model(10).to_schema())
    assert described(model(10).to_schema()) != described(model(11).to_schema())
    assert described(model(10).to_schema()) != described(model_le(10).to_schema())


def test_check_code_is_described_the_same_after_the_interpreter_specialises_it() -> None:
    check = pa.Check(lambda s: s > 0)
    schema = pa.DataFrameSchema({"x": pa.Column(int, check)})
    before = described(schema)
    for i in range(5000):
        check._check_fn(i)
    assert described(schema) == before


# --- custom checks bound to state: methods, callable objects, partials, globals ----------


class Between:
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def check(self, s: pd.Series) -> pd.Series:
        return (s >= self.lo) & (s <= self.hi)

    def __call__(self, s: pd.Series) -> pd.Series:
        return self.check(s)


class SlottedBetween:
    __slots__ = ("lo", "__hi")

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.__hi = lo, hi

    def check(self, s: pd.Series) -> pd.Series:
        return (s >= self.lo) & (s <= self.__hi)


class Range(NamedTuple):
    lo: float
    hi: float

    def check(self, s: pd.Series) -> pd.Series:
        return (s >= self.lo) & (s <= self.hi)


class Allowed:
    def __init__(self, labels: Any) -> None:
        self.labels = labels

    def check(self, s: pd.Series) -> pd.Series:
        return s.isin(self.labels)


def in_range(s: pd.Series, lo: float, hi: float) -> pd.Series:
    return (s >= lo) & (s <= hi)


def within(lo: float, hi: float, s: pd.Series) -> pd.Series:
    return (s >= lo) & (s <= hi)


def bounded(check_fn: Any) -> pa.DataFrameSchema:
    return pa.DataFrameSchema({"score": pa.Column(float, pa.Check(check_fn))})


@pytest.mark.parametrize("make", [
    lambda lo, hi: Between(lo, hi).check,
    lambda lo, hi: SlottedBetween(lo, hi).check,
    lambda lo, hi: Range(lo, hi).check,
    lambda lo, hi: Between(lo, hi),
    lambda lo, hi: functools.partial(in_range, lo=lo, hi=hi),
    lambda lo, hi: functools.partial(within, lo, hi),
], ids=["method", "slots", "namedtuple", "callable_object", "partial", "partial_args"])
def test_a_check_bound_to_state_changes_with_the_state(make: Any) -> None:
    """A check given as a bound method Between(0, 1).check ignored the instance's bounds:
    tightening them to Between(0, 0.5) kept the fingerprint and reused partitions that
    fail the new rule. A callable object Between(0, 1) was refused outright."""
    assert described(bounded(make(0, 1))) == described(bounded(make(0, 1)))
    assert described(bounded(make(0, 1))) != described(bounded(make(0, 0.5)))
    assert described(bounded(make(0, 1))) != described(bounded(make(-1, 1)))


def test_a_builtin_bound_method_changes_with_its_object() -> None:
    """frozenset({...}).__contains__ was described as 'builtins.__contains__' whatever the
    set held, so a changed label set reused partitions with the old labels."""
    def labels(allowed: frozenset[str]) -> pa.DataFrameSchema:
        check = pa.Check(allowed.__contains__, element_wise=True)
        return pa.DataFrameSchema({"label": pa.Column(str, check)})

    assert described(labels(frozenset({"a", "b"}))) == described(labels(frozenset({"b", "a"})))
    assert described(labels(frozenset({"a", "b"}))) != described(labels(frozenset({"a"})))


def test_methods_of_different_classes_with_equal_state_differ() -> None:
    class Other(Between):
        pass

    assert described(bounded(Between(0, 1).check)) != described(bounded(Other(0, 1).check))


def test_a_check_bound_to_unencodable_state_is_a_config_error() -> None:
    """Allowed(pd.Index([...])).check could not say when its labels change: it must be
    refused where the schema is declared, naming the check, the attribute and the fix."""
    check = pa.Check(Allowed(pd.Index(["low", "high"])).check, name="allowed")
    with pytest.raises(ConfigError) as caught:
        describe_schema(pa.DataFrameSchema({"label": pa.Column(str, check)}))
    message = str(caught.value)
    assert message.startswith("schema column 'label' check 'allowed' ")
    assert "Allowed attribute 'labels'" in message and "pandas.Index" in message
    assert "tuple" in message  # the fix


def test_an_object_in_a_checks_state_is_a_config_error() -> None:
    """Instance attributes follow the rules for captured values: a plain object has none."""
    with pytest.raises(ConfigError, match="Between attribute 'hi'"):
        describe_schema(bounded(Between(0, object()).check))


def test_a_method_of_an_unencodable_object_is_a_config_error() -> None:
    def known(fn: Any) -> pa.DataFrameSchema:
        check = pa.Check(fn, element_wise=True, name="known")
        return pa.DataFrameSchema({"label": pa.Column(str, check)})

    with pytest.raises(ConfigError, match=r"^schema column 'label' check 'known' Index attr"):
        describe_schema(known(pd.Index(["low", "high"]).__contains__))
    with pytest.raises(ConfigError, match=r"^schema column 'label' check 'known' "):
        describe_schema(known(np.random.default_rng(0).random))


def test_a_check_object_referring_to_itself_is_described() -> None:
    between = Between(0, 1)
    between.again = between.check  # type: ignore[attr-defined]
    assert described(bounded(between.check)) == described(bounded(between.check))


LABELS = ("low", "high")
LABEL_INDEX = pd.Index(["low", "high"])
UNIT = Between(0, 1)


def is_label(value: str) -> bool:
    return value in LABELS


def test_changing_a_global_a_check_reads_changes_the_description(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = pa.DataFrameSchema({"label": pa.Column(str, pa.Check(lambda s: s.isin(LABELS)))})
    before = described(schema)
    monkeypatch.setitem(globals(), "LABELS", ("low", "mid", "high"))
    assert described(schema) != before


def test_a_check_reading_an_unencodable_global_is_a_config_error() -> None:
    """ALLOWED = pd.Index([...]) read by a check was silently left out of the description
    (the same value captured in a closure was a ConfigError): changing it reused
    partitions with the old labels."""
    check = pa.Check(lambda s: s.isin(LABEL_INDEX), name="known")
    with pytest.raises(ConfigError) as caught:
        describe_schema(pa.DataFrameSchema({"label": pa.Column(str, check)}))
    message = str(caught.value)
    assert message.startswith("schema column 'label' check 'known' global 'LABEL_INDEX' ")
    assert "pandas.Index" in message and "tuple, list or frozenset" in message


def test_a_global_check_object_changes_with_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module-level Between(0, 1) called by a check was left out like a helper function."""
    schema = bounded(lambda s: UNIT(s) & UNIT.check(s))
    before = described(schema)
    assert described(schema) == before
    monkeypatch.setitem(globals(), "UNIT", Between(0, 0.5))
    assert described(schema) != before


def test_modules_functions_classes_and_builtins_a_check_reads_are_left_out() -> None:
    def check(s: pd.Series) -> pd.Series:
        return s.map(is_label) & pd.Series(np.ones(len(s), dtype=bool), index=s.index) \
            & isinstance(s, pd.Series) & bool(math.isfinite(1.0)) & bool(Precision.BF16)

    schema = pa.DataFrameSchema({"label": pa.Column(str, pa.Check(check))})
    assert described(schema) == described(schema)


def test_an_attribute_named_like_an_unencodable_global_is_no_error() -> None:
    """co_names holds attribute names too: df.LABEL_INDEX is a column, not the global."""
    check = pa.Check(lambda df: df.LABEL_INDEX.notna())
    describe_schema(pa.DataFrameSchema({"LABEL_INDEX": pa.Column(str)}, checks=check))


def test_tightening_a_bound_method_check_recomputes(tmp_path: Path) -> None:
    """End to end: Between(0, 1).check then Between(0, 0.5).check reused the partition
    committed under the looser rule instead of calling the model again."""
    calls: list[int] = []

    @dg.asset
    def values() -> pd.DataFrame:
        return pd.DataFrame({"id": ["a", "b", "c"], "x": [0.1, 0.2, 0.3]})

    def stage(between: Between) -> dg.AssetsDefinition:
        schema = pa.DataFrameSchema({"id": pa.Column(str),
                                     "score": pa.Column(float, pa.Check(between.check))})

        @model_stage(upstream=values, schema=schema, name="bounded")
        def bounded(batch: pd.DataFrame, stage: StageContext) -> pd.DataFrame:
            calls.append(len(batch))
            return pd.DataFrame({"id": batch.id.to_numpy(), "score": batch.x.to_numpy()})

        return bounded

    io = AtomicObjectStoreIOManager(base_uri=(tmp_path / "lr").as_uri())
    resources = {"io_manager": io}
    assert dg.materialize([values, stage(Between(0, 1))], resources=resources).success
    assert calls == [3]
    again = stage(Between(0, 1))
    assert dg.materialize([values, again], resources=resources, selection=[again]).success
    assert calls == [3], "the same rule must reuse"
    tightened = stage(Between(0, 0.5))
    assert dg.materialize([values, tightened], resources=resources,
                          selection=[tightened]).success
    assert calls == [3, 3], "a tightened rule must call the model again"


# --- stage fingerprints ------------------------------------------------------------------

STAGE: dict[str, Any] = {
    "code_version": "1", "config": {"model": "bert-base@v2", "lr": 0.1},
    "schema_description": describe_schema(scores()), "batch_size": 64,
    "one_row_per_input": True, "max_bad_fraction": 0.0,
    "inputs": [("raw/docs", "2024-01-01", "abc123")],
}


def stage_fingerprint(inputs: Any, **declared: Any) -> str:
    return stage_fingerprint_from(stage_static(**declared), inputs)


@pytest.mark.parametrize("field, value", [
    ("code_version", "2"), ("config", {"model": "bert-base@v3", "lr": 0.1}),
    ("schema_description", describe_schema(scores(ge=1))), ("batch_size", 32),
    ("one_row_per_input", False), ("max_bad_fraction", 0.01),
    ("inputs", [("raw/docs", "2024-01-01", "abc124")]),
    ("inputs", [("raw/docs", None, "abc123")]),
    ("inputs", [("raw/docs", "2024-01-01", "abc123"), ("raw/docs", "2024-01-02", "d")]),
])
def test_every_part_changes_the_fingerprint(field: str, value: Any) -> None:
    """The old fingerprint left out the schema, max_bad_fraction and one_row_per_input:
    changing them reused output made under the old rules."""
    assert stage_fingerprint(**{**STAGE, field: value}) != stage_fingerprint(**STAGE)


def test_dict_order_does_not_change_the_fingerprint() -> None:
    assert stage_fingerprint(**{**STAGE, "config": {"lr": 0.1, "model": "bert-base@v2"}}) \
        == stage_fingerprint(**STAGE)


# --- properties --------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def meaning(value: Any) -> Any:
    """What a JSON-like value means: 1 and 1.0 (and -0.0 and 0) alike, True not 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (int, float)):
        return ("number", value)  # 1 == 1.0 and -0.0 == 0, in hash too
    if isinstance(value, list):
        return ("list", tuple(meaning(v) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((k, meaning(v)) for k, v in value.items()))
    return (type(value).__name__, value)


@settings(database=None, deadline=None, max_examples=300)
@given(json_like)
def test_canonical_is_deterministic(value: Any) -> None:
    assert canonical(value, what="config") == canonical(value, what="config")
    if isinstance(value, dict):
        shuffled = dict(reversed(list(value.items())))
        assert canonical(shuffled, what="config") == canonical(value, what="config")


@settings(database=None, deadline=None, max_examples=300)
@given(st.lists(json_like, min_size=2, max_size=8))
@example([1, 1.0, True, "1", [1], ["1"], {"1": 1}, None, 0, -0.0, False, "", [], {}])
def test_canonical_is_injective(values: list[Any]) -> None:
    encoded = {canonical(v, what="config") for v in values}
    assert len(encoded) == len({meaning(v) for v in values})


@settings(database=None, deadline=None, max_examples=300)
@given(json_like, json_like)
def test_canonical_bytes_equal_exactly_when_values_mean_the_same(a: Any, b: Any) -> None:
    assert same(a, b) == (meaning(a) == meaning(b))
