"""Partition keys from users can never escape their folder or collide."""

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longrun_dagster.commit import PartitionStore
from longrun_dagster.errors import ConfigError
from longrun_dagster.storage import LocalStore, ObjectStore
from longrun_dagster.storage.keys import asset_prefix, encode_component, partition_prefix

HOSTILE = [
    "..", ".", "../../etc/passwd", "a/b", "/abs", "a\\b", "nul\x00byte", "bell\x07\n\r\t",
    "k" * 1000, "k" * 999 + "j", "日本語-ключ-🚀", "", " ", "%2F", "p=1", "_manifest.json",
    "2024-01-01|shard-3", ".hidden", "\x00empty", "%empty", "k" * 90 + "~" + "0" * 24,
]


@pytest.mark.parametrize("key", HOSTILE)
def test_encoded_component_is_one_safe_short_folder_name(key: str) -> None:
    enc = encode_component(key)
    assert enc and "/" not in enc and "\\" not in enc and not enc.startswith(".")
    assert all(32 < ord(c) < 127 for c in enc)
    assert len(enc) <= 140


def test_distinct_keys_give_distinct_folders() -> None:
    assert len({encode_component(k) for k in HOSTILE}) == len(HOSTILE)


def test_prefix_stays_under_the_asset_folder(tmp_path: Path) -> None:
    for key in HOSTILE:
        folder = (tmp_path / partition_prefix(["asset"], key)).resolve()
        assert folder.parent == (tmp_path / "asset").resolve()


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_partition_keys_commit_and_read_back(store: ObjectStore, key: str) -> None:
    parts = PartitionStore(store)
    parts.commit(["a"], key, {"data": (b"payload", "bin")}, format="json", rows=None,
                 run_id="r1")
    manifest, data = parts.read(["a"], key)
    assert data == b"payload" and manifest.partition == key
    if isinstance(store, LocalStore):
        assert all(p.resolve().is_relative_to(store.root) for p in store.root.rglob("*"))


def _nested_or_shared(prefixes: list[str]) -> list[tuple[str, str]]:
    """Pairs where one prefix equals or contains the other; sorted, so neighbours suffice:
    if x is a prefix of y, everything between them in sorted order starts with x too."""
    ordered = sorted(prefixes)
    return [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b.startswith(a)]


def test_user_key_equal_to_a_shortened_name_gets_its_own_folder() -> None:
    """'~' was never percent-encoded, yet it marks a shortened key: a 115-character user key
    equal to another key's shortened name encoded to the same folder, and the second
    partition overwrote the first."""
    long_key = "k" * 200
    shortened = encode_component(long_key)
    assert "~" in shortened and len(shortened) == 115
    assert partition_prefix(["a"], long_key) != partition_prefix(["a"], shortened)
    assert partition_prefix([long_key], None) != partition_prefix([shortened], None)


@pytest.mark.parametrize(
    ("inner", "outer"),
    [
        ((("a", "_unpartitioned", "_checkpoints"), None), (("a",), None)),
        ((("a", "_unpartitioned"), None), (("a",), None)),
        ((("a", "p=1"), None), (("a",), "1")),
        ((("a", "p=1", "_checkpoints"), "x"), (("a",), "1")),
        ((("a", "_manifest.json"), None), (("a",), None)),
    ],
)
def test_asset_path_never_lands_in_another_assets_partition(
    inner: tuple[tuple[str, ...], str | None], outer: tuple[tuple[str, ...], str | None]
) -> None:
    """Asset path components were encoded like partition keys, so asset
    ["a", "_unpartitioned", "_checkpoints"] lived in unpartitioned asset ["a"]'s checkpoint
    folder and ["a", "p=1"] inside partition "1" of asset ["a"]."""
    prefixes = [partition_prefix(*inner), partition_prefix(*outer)]
    assert _nested_or_shared(prefixes) == []


def test_ordinary_asset_names_keep_their_folders() -> None:
    """Existing storage layouts stay readable: plain names are not re-encoded."""
    assert partition_prefix(["scores"], "2024-01-01") == "scores/p=2024-01-01/"
    assert partition_prefix(["stage", "my_asset"], None) == "stage/my_asset/_unpartitioned/"
    assert asset_prefix(["stage", "my_asset"]) == "stage/my_asset/"
    assert partition_prefix(["stage", "my_asset"], "1").startswith("stage/my_asset/")


_LONG = "k" * 200
_COMPONENTS = [
    "a", "1", "_unpartitioned", "_checkpoints", "_manifest.json", "_", "p=1", "p=", "=",
    "~", "%7E", "%5F", "%3D", "", "..", ".", "a/b", _LONG, encode_component(_LONG),
    "p=" + encode_component(_LONG), "%empty",
]


def test_no_two_small_storage_locations_share_or_nest() -> None:
    """Every asset path of up to two hostile components, with every partition (or none):
    no prefix equals or contains another, so no asset or partition can overwrite another."""
    paths = [(c,) for c in _COMPONENTS] + [(c, d) for c in _COMPONENTS for d in _COMPONENTS]
    partitions: list[str | None] = [None, *_COMPONENTS]
    prefixes = [partition_prefix(p, q) for p in paths for q in partitions]
    assert len(set(prefixes)) == len(prefixes)
    assert _nested_or_shared(prefixes) == []


@st.composite
def _locations(draw: st.DrawFn) -> list[tuple[tuple[str, ...], str | None]]:
    """Locations under one drawn base path, so nesting is likely rather than rare; the
    vocabulary holds a drawn long key beside its own shortened name."""
    long_key = draw(st.text(min_size=100, max_size=300))
    shortened = encode_component(long_key)
    component = st.one_of(
        st.sampled_from([*_COMPONENTS, long_key, shortened, "p=" + shortened]),
        st.text(alphabet="_p=~%7E5F3D.k/", max_size=8),
        st.text(max_size=20),
    )
    base = draw(st.lists(component, min_size=1, max_size=2))
    location = st.tuples(
        st.lists(component, max_size=2).map(lambda tail: (*base, *tail)),
        st.none() | component,
    )
    return draw(st.lists(location, min_size=2, max_size=8, unique=True))


@settings(database=None, max_examples=300)
@given(_locations())
def test_distinct_locations_never_share_or_nest(
    locations: list[tuple[tuple[str, ...], str | None]],
) -> None:
    """For any distinct (asset path, partition) pairs, no partition_prefix equals or is a
    prefix of another (no shared or nested storage)."""
    prefixes = [partition_prefix(asset, partition) for asset, partition in locations]
    assert len(set(prefixes)) == len(prefixes)
    assert _nested_or_shared(prefixes) == []


NOT_STR_KEYS = [3, ["a"], date(2024, 1, 1), b"2024-01-01", ("a", 1)]


@pytest.mark.parametrize("key", NOT_STR_KEYS, ids=lambda k: type(k).__name__)
def test_a_key_that_is_not_a_string_is_refused_naming_asset_key_and_fix(
    tmp_path: Path, key: Any
) -> None:
    """begin(["a"], 3, ...) or a date key died with a bare TypeError from URL quoting deep
    inside storage/keys.py, and a bytes key shared the folder of its str twin."""
    parts = PartitionStore(LocalStore(tmp_path))
    calls: list[Callable[[], object]] = [
        lambda: parts.begin(["scores"], key, run_id="r"),
        lambda: parts.lookup(["scores"], key),
        lambda: parts.uri(["scores"], key),
        lambda: partition_prefix(["scores"], key),
    ]
    for call in calls:
        with pytest.raises(ConfigError) as caught:
            call()
        message = str(caught.value)
        assert "scores" in message and repr(key) in message
        assert type(key).__qualname__ in message and "str(" in message


def test_an_asset_path_part_that_is_not_a_string_is_refused() -> None:
    """The same bare TypeError came from an asset path holding an int."""
    with pytest.raises(ConfigError, match=r"asset path .*1.*int.*str\("):
        partition_prefix(["scores", 1], "k")  # type: ignore[list-item]
