"""The ledger of a partition's batches: which input rows each batch covered and how many
rows it put in the output and in the quarantine. A checkpoint carries it, ``restore``
takes only one that covers batches 0..k-1 exactly once, and a commit proves with it that
every input row is in the output or in the quarantine before anything is published.

The checks are the last line of defence, whatever the bug upstream of them: a cursor that
skipped a failed write's batches, a shard that lost rows, a validator that dropped rows.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from longrun_dagster.errors import IncompleteCommit


@dataclass(frozen=True)
class Entry:
    """One completed batch: input rows ``[start, stop)``, rows out (valid), rows
    quarantined, what the stage's function counted while it ran (``stage.count``:
    tokens, retries), so a resume keeps the partition's counters exact, and the digest of
    its valid rows (``formats.tables.digest``), so the partition's content version does
    not depend on where an attempt was interrupted."""

    batch: int
    start: int
    stop: int
    rows_out: int
    rows_quarantined: int
    counts: Mapping[str, float] = field(default_factory=dict)
    digest: str | None = None

    def as_json(self) -> list[Any]:
        rows: list[Any] = [self.batch, self.start, self.stop, self.rows_out,
                           self.rows_quarantined]
        if self.digest is not None:
            return rows + [dict(self.counts), self.digest]
        return rows + [dict(self.counts)] if self.counts else rows


@dataclass(frozen=True)
class Plan:
    """How a partition's input is cut into batches (stable: the same input, the same
    batches, so checkpoints of one attempt are valid for the next)."""

    rows_in: int
    batch_size: int

    @property
    def batches(self) -> int:
        return -(-self.rows_in // self.batch_size)

    def rows_of(self, batch: int) -> tuple[int, int]:
        start = batch * self.batch_size
        return start, min(start + self.batch_size, self.rows_in)


class Ledger:
    """The entries of the batches completed so far, in batch order."""

    def __init__(self, plan: Plan, entries: Iterable[Entry] = ()) -> None:
        self.plan = plan
        self.entries: list[Entry] = list(entries)

    def add(self, batch: int, rows_out: int, rows_quarantined: int,
            counts: Mapping[str, float] | None = None, digest: str | None = None) -> Entry:
        start, stop = self.plan.rows_of(batch)
        entry = Entry(batch, start, stop, rows_out, rows_quarantined, dict(counts or {}),
                      digest)
        self.entries.append(entry)
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def rows_out(self) -> int:
        return sum(e.rows_out for e in self.entries)

    @property
    def rows_quarantined(self) -> int:
        return sum(e.rows_quarantined for e in self.entries)

    @property
    def counts(self) -> dict[str, float]:
        """Each counter summed over the batches (each batch once)."""
        total: dict[str, float] = {}
        for entry in self.entries:
            for name, n in entry.counts.items():
                total[name] = total.get(name, 0) + n
        return total

    @property
    def digests(self) -> list[str] | None:
        """Every batch's content digest in batch order (None: a batch has none, e.g. one
        restored from a checkpoint written before 0.3)."""
        entries = sorted(self.entries, key=lambda e: e.batch)
        if any(e.digest is None for e in entries):
            return None
        return [e.digest for e in entries if e.digest is not None]

    def span(self, first: int, stop: int) -> tuple[int, int]:
        """(rows out, rows quarantined) of batches ``[first, stop)``."""
        chosen = [e for e in self.entries if first <= e.batch < stop]
        return sum(e.rows_out for e in chosen), sum(e.rows_quarantined for e in chosen)

    def as_json(self) -> list[list[int]]:
        return [e.as_json() for e in self.entries]

    @classmethod
    def from_json(cls, plan: Plan, raw: Any) -> "Ledger":
        """A ledger read from a cursor; ``ValueError`` if it is not a list of entries."""
        if not isinstance(raw, list) or not all(_entry_ok(e) for e in raw):
            raise ValueError("its ledger is missing or malformed")
        return cls(plan, (Entry(e[0], e[1], e[2], e[3], e[4],
                                dict(e[5]) if len(e) >= 6 else {},
                                e[6] if len(e) == 7 else None) for e in raw))

    # -- checks ---------------------------------------------------------------------------

    def problems(self, *, upto: int, one_row_per_input: bool) -> list[str]:
        """What keeps this ledger from covering batches ``0..upto-1`` exactly once, each
        with the input rows the plan gives it (and, one row per input, every input row in
        the output or the quarantine); empty if nothing."""
        seen: dict[int, int] = {}
        for entry in self.entries:
            seen[entry.batch] = seen.get(entry.batch, 0) + 1
        found = []
        missing = [b for b in range(upto) if b not in seen]
        if missing:
            found.append(f"batches {_ranges(missing)} are missing")
        twice = sorted(b for b, n in seen.items() if n > 1)
        if twice:
            found.append(f"batches {_ranges(twice)} are there more than once")
        extra = sorted(b for b in seen if not 0 <= b < upto)
        if extra:
            found.append(f"batches {_ranges(extra)} are beyond batch {upto - 1}")
        for entry in self.entries:
            if (entry.start, entry.stop) != self.plan.rows_of(entry.batch):
                found.append(f"batch {entry.batch} covers input rows {entry.start}.."
                             f"{entry.stop - 1}, not {self.plan.rows_of(entry.batch)}")
            elif one_row_per_input and \
                    entry.rows_out + entry.rows_quarantined != entry.stop - entry.start:
                found.append(f"batch {entry.batch} has {entry.stop - entry.start} input rows "
                             f"but {entry.rows_out} out and {entry.rows_quarantined} "
                             "quarantined")
        return found

    def verify_commit(self, *, where: str, rows_out: int, rows_quarantined: int,
                      one_row_per_input: bool,
                      parts: Sequence[tuple[int, int, int]] | None = None) -> None:
        """Raise ``IncompleteCommit`` unless the ledger covers every batch of the plan
        exactly once and the frames about to be committed hold exactly its rows. With
        ``parts`` (the output as several objects: ``(first batch, stop batch, rows)`` each,
        in order), also unless they tile the batches in order, each holding the ledger's
        rows of its batches."""
        found = self.problems(upto=self.plan.batches, one_row_per_input=one_row_per_input)
        if parts is not None:
            found += _tiling(self, parts)
        if rows_out != self.rows_out:
            found.append(f"the output holds {rows_out} rows, the ledger {self.rows_out}")
        if rows_quarantined != self.rows_quarantined:
            found.append(f"the quarantine holds {rows_quarantined} rows, the ledger "
                         f"{self.rows_quarantined}")
        if one_row_per_input and not found and \
                self.rows_out + self.rows_quarantined != self.plan.rows_in:
            found.append(f"{self.plan.rows_in} input rows, but {self.rows_out} out and "
                         f"{self.rows_quarantined} quarantined")
        if found:
            missing = [b for b in range(self.plan.batches)
                       if b not in {e.batch for e in self.entries}]
            raise IncompleteCommit(
                f"{where}: refusing to commit an incomplete output: {'; '.join(found)}. "
                "Nothing was committed. This is a bug in longrun-dagster or in a hook that "
                "changed the loop's frames; re-run the partition (it resumes from its last "
                "complete checkpoint) and report it", missing_batches=missing)


def _tiling(ledger: "Ledger", parts: Sequence[tuple[int, int, int]]) -> list[str]:
    found, at = [], 0
    for first, stop, rows in parts:
        if first != at:
            found.append(f"an output object holds batches {first}..{stop - 1} after batch "
                         f"{at - 1}")
        want = ledger.span(first, stop)[0]
        if rows != want:
            found.append(f"the output object of batches {first}..{stop - 1} holds {rows} "
                         f"rows, the ledger {want}")
        at = max(at, stop)
    if at != ledger.plan.batches:
        found.append(f"the output objects end at batch {at - 1}, the plan at batch "
                     f"{ledger.plan.batches - 1}")
    return found


def _entry_ok(raw: Any) -> bool:
    """Five ints, then (with counters or a digest) a dict of names to finite numbers,
    then (with a digest) a string."""
    if not isinstance(raw, list) or len(raw) not in (5, 6, 7):
        return False
    if not all(type(v) is int for v in raw[:5]):
        return False
    if len(raw) == 7 and not isinstance(raw[6], str):
        return False
    return len(raw) == 5 or (isinstance(raw[5], dict) and all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v)
        for k, v in raw[5].items()))


def _ranges(batches: Sequence[int]) -> str:
    """``0-2, 5, 7-9``."""
    parts, run = [], [batches[0]] if batches else []
    for b in batches[1:]:
        if b == run[-1] + 1:
            run.append(b)
        else:
            parts.append(run)
            run = [b]
    if run:
        parts.append(run)
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)
