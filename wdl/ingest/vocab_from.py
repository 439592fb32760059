"""`wdl data import NEW --vocab-from DATASET`: a data set that continues an earlier one's ids.

Every value the earlier data set knows keeps its id; values seen for the first time get ids after
the old ones (most frequent first, as any vocabulary here; min_frequency applies to them, top_k
bounds the whole vocabulary). So a model trained on the earlier data set reads the new one with
each table grown at its end (`wdl train --init-from`, wdl/train/warm_start.py). Old values keep
their ids even when absent from the new rows.

The manifest records the parent (`parent`: its folder and manifest hash; `lineage`: every
ancestor's hash, oldest first, which a warm start checks) and each column's growth
(`vocab_growth`: vocabulary sizes before and after, new values and the train rows' occurrences of
them). Hashed columns need nothing: their ids do not depend on the data.

Bounded vocabularies: a column with `max_rows` in the spec holds at most that many ids (0
included). New values past it take the ids of the values unseen in train for the longest (the
generation, a data set's place in its lineage, that last saw each value is kept beside the
vocabulary, in vocab/<column>.last_seen.json; ties by id). Those ids are listed in the manifest
(`recycled`) and a warm start resets their rows and optimiser state to a fresh run's; the old
values lose their rows (read as id 0, unknown). New values beyond what can be recycled (every old
value seen today) get no id and are counted. Values seen fewer than min_frequency times share id 0.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wdl.data.manifest import load_manifest
from wdl.errors import DataError, first_line


class Parent:
    """The earlier data set's vocabularies, for the columns of `spec` that have one there."""

    def __init__(self, path: str, spec: Any, types: dict[str, pa.DataType]) -> None:
        self.manifest = m = load_manifest(path)
        self.vocabs: dict[str, list] = {}
        self.growth: dict[str, dict[str, int]] = {}
        self.recycled: dict[str, list[int]] = {}  # column -> ids given to other values
        self.last_seen: dict[str, list[int]] = {}  # column -> per id from 1, the generation that last saw it
        self.generation = len(m.raw.get("lineage", [])) + 1  # this data set's place in the lineage
        for name, c in spec.columns.items():
            entry = m.columns.get(name)
            if c.kind == "dense" or entry is None:  # a new column gets a vocabulary of its own
                continue
            if entry.get("kind") != c.kind:
                raise DataError(f"--vocab-from {m.root}: column {name!r} is {entry.get('kind')} there, {c.kind} here; "
                                "a model trained on it cannot read it another way")
            where = m.vocab_path(name)
            if where is None:
                raise DataError(f"--vocab-from {m.root}: column {name!r} has no vocabulary file there (its ids are "
                                "not raw values), so new values cannot be numbered after its ids")
            raw = entry.get("raw_type")
            if raw and raw != str(types[name]):
                raise DataError(f"--vocab-from {m.root}: column {name!r} holds {raw} values there, {types[name]} here")
            try:
                values = json.loads(where.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"--vocab-from {m.root}: cannot read {where} ({first_line(e)})") from None
            self.vocabs[name] = values[1:]  # position 0 is the reserved unknown id
            seen = m.root / entry["last_seen_file"] if entry.get("last_seen_file") else None
            try:
                self.last_seen[name] = json.loads(seen.read_text())[1:] if seen else [0] * len(self.vocabs[name])
            except (OSError, ValueError) as e:
                raise DataError(f"--vocab-from {m.root}: cannot read {seen} ({first_line(e)})") from None

    def extend(self, name: str, counts: Any, min_frequency: int, top_k: int | None,
               max_rows: int | None = None) -> tuple[pa.Array, int]:
        """Column `name`'s vocabulary: the parent's values, then this import's new ones (seen at
        least min_frequency times in train, most frequent first, the whole at most top_k, recycling
        ids past max_rows); and the number of distinct values seen in train. `counts`: its ValueCounts."""
        old = self.vocabs.get(name)
        if old is None:
            return counts.vocabulary(min_frequency, top_k)
        t = counts.table()
        values = t.column("value")
        try:
            old_values = pa.array(old, type=None if pa.types.is_null(values.type) else values.type)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as e:
            raise DataError(f"--vocab-from {self.manifest.root}: column {name!r}'s vocabulary there does not hold "
                            f"{values.type} values ({first_line(e)})") from None
        fresh = t.filter(pc.and_(pc.invert(pc.is_in(values, value_set=old_values)),
                                 pc.greater_equal(t.column("count"), min_frequency))) if t.num_rows else t
        order = pc.sort_indices(fresh, sort_keys=[("count", "descending"), ("value", "ascending")])
        if top_k is not None:
            order = order[:max(0, top_k - len(old))]
        fresh = fresh.take(order)
        new_values = (fresh.column("value").combine_chunks() if fresh.num_rows else old_values[:0]).cast(old_values.type)
        seen_today = pc.is_in(old_values, value_set=values.combine_chunks()).to_numpy(zero_copy_only=False) if t.num_rows \
            else np.zeros(len(old), bool)
        last = np.where(seen_today, self.generation, np.asarray(self.last_seen[name], dtype=np.int64))
        room = len(new_values) if max_rows is None else max(0, max_rows - 1 - len(old))
        vocab = pa.concat_arrays([old_values, new_values[:room]])
        rest = new_values[room:]
        # the ids of the values unseen for the longest (never one seen today), oldest first, then by id
        stale = [j for j in np.lexsort((np.arange(len(old)), last)) if last[j] < self.generation][:len(rest)]
        if stale:
            taken = np.arange(len(vocab))
            taken[stale] = len(vocab) + np.arange(len(stale))
            vocab = pa.concat_arrays([vocab, rest[:len(stale)]]).take(pa.array(taken))
        ids = [int(j) + 1 for j in stale]
        self.recycled[name] = ids
        self.last_seen[name] = [*np.where(np.isin(np.arange(len(old)), stale), self.generation, last).tolist(),
                                *[self.generation] * min(room, len(new_values))]
        counted = fresh.column("count").to_numpy(zero_copy_only=False) if fresh.num_rows else np.zeros(0, np.int64)
        self.growth[name] = {"vocab_size_before": len(old) + 1, "vocab_size": len(vocab) + 1,
                             "new_values": fresh.num_rows, "new_value_rows": int(counted.sum()),
                             **({"recycled": len(ids), "without_row": len(rest) - len(ids),
                                 "without_row_rows": int(counted[room + len(ids):].sum())} if max_rows else {})}
        return vocab, t.num_rows

    def record(self, w: Any, name: str, entry: dict) -> None:
        """Beside column `name`'s vocabulary, when it is bounded: the generation that last saw each id's value."""
        if name in self.last_seen and name in self.growth and "recycled" in self.growth[name]:
            entry["last_seen_file"] = w.write_vocab(f"{name}.last_seen", self.last_seen[name])

    def manifest_entries(self) -> dict[str, Any]:
        """What the new manifest records of its parent."""
        m = self.manifest
        return {"parent": {"path": str(m.root), "identity": m.identity},
                "lineage": [*m.raw.get("lineage", []), m.identity], "vocab_growth": self.growth,
                **({"recycled": {k: v for k, v in self.recycled.items() if v}} if any(self.recycled.values()) else {})}


def growth_lines(growth: dict[str, dict[str, int]]) -> list[str]:
    """The import summary's lines: new values per column and the train rows they occur in."""
    return [f"    {n}: {g['new_values']:,} new values ({g['vocab_size_before']:,} -> {g['vocab_size']:,} ids), "
            f"seen {g['new_value_rows']:,} times in train rows"
            + (f"; {g['recycled']:,} ids recycled (unseen the longest), {g['without_row']:,} new values without one "
               f"(id 0, seen {g['without_row_rows']:,} times)" if "recycled" in g else "") for n, g in growth.items()]
