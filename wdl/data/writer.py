"""Atomic writer of a `wdl` dataset folder (see docs/dataset-format.md).

Everything goes into a temporary sibling folder `DIR.tmp-<pid>-<random>`; `manifest.json` is
written last and the folder is renamed into place only when complete, so a crash, a full disk
or Ctrl-C never leaves something at DIR that looks like a finished data set.

    with DatasetWriter(out, name="criteo-kaggle") as w:
        w.write("train", table)                      # any number of times, any sizes
        w.write_vocab("c1", ["a", "b"])              # ids 1, 2 (0 = out-of-vocabulary)
        w.add_table("items.parquet", items)          # a further table the manifest will name
        w.commit(source={...}, label="label", columns={...}, split={...})
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wdl.data.manifest import FORMAT, MANIFEST
from wdl.errors import DataError, clip

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _os_error(what: str, err: OSError) -> DataError:
    # One line naming the file: OSError's str() may be multi-line for pyarrow errors.
    text = str(err).strip()
    reason = err.strerror or (clip(text.splitlines()[0]) if text else type(err).__name__)
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return DataError(f"{what}: {reason}{where}")


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartFile:
    """One part file being written. A thread of its own writes its row groups, in order, so that
    with a backlog (DatasetWriter's `backlog_bytes`) the caller goes on while files are written
    side by side: a split's next file while the last is finished, other splits' files."""

    def __init__(self, path: pathlib.Path, schema: pa.Schema) -> None:
        self.path = path
        self.writer = pq.ParquetWriter(path, schema)
        self._thread = ThreadPoolExecutor(1)

    def write(self, rows: pa.Table) -> Future:
        """Write `rows` as one row group."""
        return self._thread.submit(self.writer.write_table, rows, row_group_size=rows.num_rows)

    def finish(self) -> Future:
        """Close the file and flush it to disk (commit's fsync then finds it clean)."""
        done = self._thread.submit(self._finish)
        self._thread.shutdown(wait=False)
        return done

    def _finish(self) -> None:
        self.writer.close()
        _fsync(self.path)

    def abandon(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        try:
            self.writer.close()
        except Exception:  # already failing; the folder goes away anyway
            pass


class _Split:
    """Output state of one split: the open part file and row-group buffering."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.pending: list[pa.Table] = []  # rows not yet written, less than one row group
        self.pending_rows = 0
        self.part: _PartFile | None = None  # the file being written
        self.files: list[dict[str, Any]] = []  # {"path", "rows", "row_groups"}, relative paths
        self.positives = 0.0  # sum of the label column written, when the writer knows the label


class DatasetWriter:
    """Writes splits of Parquet shards plus vocabularies, then a manifest, atomically.

    Rows appended with `write` are buffered so that every row group (except the last of a
    file) holds exactly `row_group_rows` rows whatever the sizes of the appended tables;
    a new `part-NNNNN.parquet` starts every `rows_per_file` rows. Given the `label` column up
    front, it sums the labels as they are written; otherwise commit reads them back from the files.
    `backlog_bytes`: how much of the rows appended may still wait for their files' threads when
    `write` returns (0: none); with enough of it, files are written side by side.
    """

    def __init__(self, out_dir, *, name: str, overwrite: bool = False, rows_per_file: int = 1_000_000,
                 row_group_rows: int = 16384, label: str | None = None, backlog_bytes: int = 0) -> None:
        if rows_per_file < 1 or row_group_rows < 1:
            raise DataError(f"rows_per_file and row_group_rows must be >= 1, got {rows_per_file}, {row_group_rows}")
        self.out = pathlib.Path(out_dir).expanduser().absolute()
        self.name = name
        self.overwrite = overwrite
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.label = label
        self.backlog_bytes = backlog_bytes
        self._backlog: deque[tuple[Future, int]] = deque()  # (write or finish of a part file, bytes)
        self._backlog_size = 0
        self._splits: dict[str, _Split] = {}
        self._vocab_files: list[str] = []
        self._tables: list[str] = []  # further files at the top of the folder (add_table)
        self._done = False
        self._check_target()
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            raise _os_error(f"cannot create data set folder next to {self.out}", e) from None

    # -- target checks -------------------------------------------------------------------
    def _check_target(self) -> None:
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise DataError(f"output {out} exists and is not a folder; choose another --out")
        if not out.exists():
            return
        if (out / MANIFEST).exists():
            if not self.overwrite:
                raise DataError(f"output {out} already holds a data set; pass --overwrite to replace it")
        elif any(out.iterdir()):
            # Never delete what we did not write, even with overwrite.
            raise DataError(f"output {out} exists, is not empty and is not a wdl data set; refusing to touch it")

    # -- writing -------------------------------------------------------------------------
    def write(self, split: str, table: pa.Table) -> None:
        """Append `table` to `split`; its schema must equal the split's first table's."""
        self._check_open()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", split) or split == "vocab":
            raise DataError(f"invalid split name {split!r} (letters, digits, '_', '-'; not 'vocab')")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        state = self._splits.get(split)
        if state is None:
            state = self._splits[split] = _Split(table.schema)
        elif not table.schema.equals(state.schema, check_metadata=False):
            raise DataError(f"split {split!r}: table schema differs from the first one written "
                            f"({clip(_schema_str(table.schema))} vs {clip(_schema_str(state.schema))})")
        if table.num_rows == 0:
            return
        if self.label in table.column_names:
            state.positives += _label_sum(table.column(self.label))
        state.pending.append(table)
        state.pending_rows += table.num_rows
        if state.pending_rows >= self.row_group_rows:
            self._drain(split, state, final=False)

    def _drain(self, split: str, state: _Split, *, final: bool) -> None:
        table = pa.concat_tables(state.pending) if len(state.pending) > 1 else state.pending[0]
        state.pending, state.pending_rows = [], 0
        start, n = 0, table.num_rows
        try:
            while n - start >= self.row_group_rows or (final and start < n):
                if state.part is None:
                    rel = f"{split}/part-{len(state.files):05d}.parquet"
                    (self.tmp / split).mkdir(exist_ok=True)
                    state.part = _PartFile(self.tmp / rel, state.schema)
                    state.files.append({"path": rel, "rows": 0, "row_groups": 0})
                info = state.files[-1]
                rows = table.slice(start, min(self.row_group_rows, n - start, self.rows_per_file - info["rows"]))
                self._queue(state.part.write(rows), rows.nbytes)
                info["rows"] += rows.num_rows
                info["row_groups"] += 1
                start += rows.num_rows
                if info["rows"] >= self.rows_per_file:
                    self._queue(state.part.finish(), 0)
                    state.part = None
        except OSError as e:
            self.abort()
            raise _os_error(f"cannot write split {split!r} of {self.out}", e) from None
        if start < n:
            state.pending, state.pending_rows = [table.slice(start)], n - start

    def _queue(self, done: Future, size: int) -> None:
        self._backlog.append((done, size))
        self._backlog_size += size
        self._settle(self.backlog_bytes)

    def _settle(self, limit: int | None) -> None:
        """Wait until at most `limit` bytes are waiting to be written (None: until every queued
        write and file finish is done, finishes weighing nothing); raises a write's OSError."""
        while self._backlog and (limit is None or self._backlog_size > limit or self._backlog[0][0].done()):
            done, size = self._backlog.popleft()
            self._backlog_size -= size
            done.result()

    def write_vocab(self, column: str, values: list) -> str:
        """Write vocab/<column>.json and return its path relative to the data set (the manifest
        records it). A column named otherwise than a file may be ("user id", "Größe", "a/b")
        gets a file name of its own: the name with those characters as "_", and a hash of it.

        `values` are the raw values of ids 1..len(values); the file stores `[null, *values]`
        so that position i is id i and id 0 stays out-of-vocabulary. vocab_size is
        len(values) + 1.
        """
        self._check_open()
        if not isinstance(column, str) or not column:
            raise DataError(f"invalid vocabulary column name {column!r}")
        if _NAME_RE.match(column):
            rel = f"vocab/{column}.json"
        else:
            digest = hashlib.blake2b(column.encode(), digest_size=4).hexdigest()
            rel = f"vocab/{re.sub(r'[^A-Za-z0-9_.-]', '_', column)[:64]}-{digest}.json"
        try:
            (self.tmp / "vocab").mkdir(exist_ok=True)
            with open(self.tmp / rel, "w", encoding="utf-8") as f:
                # dumps, not dump: only dumps runs the C encoder (same text, ~3x faster on a large vocabulary)
                f.write(json.dumps([None, *values], ensure_ascii=False, default=_json_default))
        except OSError as e:
            self.abort()
            raise _os_error(f"cannot write vocabulary {rel} of {self.out}", e) from None
        if rel not in self._vocab_files:
            self._vocab_files.append(rel)
        return rel

    def add_table(self, name: str, table: pa.Table) -> str:
        """Write `table` as the Parquet file `name` at the top of the data set (e.g. MovieLens'
        items.parquet), not a split; it moves into place with the manifest. Returns `name`, the
        path the manifest should give for it."""
        self._check_open()
        if not _NAME_RE.match(name) or not name.endswith(".parquet") or name in self._tables:
            raise DataError(f"invalid or repeated table name {name!r} (a new NAME.parquet)")
        try:
            pq.write_table(table, self.tmp / name)
        except OSError as e:
            self.abort()
            raise _os_error(f"cannot write {name} of {self.out}", e) from None
        self._tables.append(name)
        return name

    # -- finishing -----------------------------------------------------------------------
    def commit(self, *, source: dict, label: str, columns: dict, split: dict,
               extra: dict | None = None) -> pathlib.Path:
        """Close files, write manifest.json last, fsync, and rename the folder into place."""
        self._check_open()
        try:
            return self._commit(source, label, columns, split, extra or {})
        except OSError as e:
            self.abort()
            raise _os_error(f"cannot finish data set {self.out}", e) from None
        except BaseException:
            self.abort()
            raise

    def _commit(self, source, label, columns, split_info, extra) -> pathlib.Path:
        if not self._splits:
            raise DataError(f"data set {self.out}: nothing was written")
        for name, state in self._splits.items():
            if state.pending_rows:
                self._drain(name, state, final=True)
            if state.part is not None:
                self._queue(state.part.finish(), 0)
                state.part = None
            if not state.files:  # an empty split still gets one (empty) file carrying the schema
                (self.tmp / name).mkdir(exist_ok=True)
                pq.write_table(state.schema.empty_table(), self.tmp / f"{name}/part-00000.parquet")
                state.files.append({"path": f"{name}/part-00000.parquet", "rows": 0, "row_groups": 0})
            missing = [c for c in [label, *columns] if c not in state.schema.names]
            if missing:
                raise DataError(f"data set {self.out}: split {name!r} lacks columns {missing}")
        self._settle(None)  # every part file written and closed
        reserved = {"format", "name", "created", "source", "label", "columns", "split", "splits"}
        if reserved & set(extra):
            raise DataError(f"extra manifest keys may not replace {sorted(reserved & set(extra))}")
        manifest = {
            "format": FORMAT,
            "name": self.name,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": source,
            "label": label,
            "columns": columns,
            "split": split_info,
            "splits": {name: self._split_entry(state, label) for name, state in self._splits.items()},
            **extra,
        }
        # Data and vocab must be on disk before the manifest claims they are.
        for state in self._splits.values():
            for f in state.files:
                _fsync(self.tmp / f["path"])
        for rel in [*self._vocab_files, *self._tables]:
            _fsync(self.tmp / rel)
        with open(self.tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for d in [*(self.tmp / s for s in self._splits), self.tmp / "vocab", self.tmp]:
            if d.is_dir():
                _fsync(d)
        self._move_into_place()
        self._done = True
        return self.out

    def _split_entry(self, state: _Split, label: str) -> dict:
        rows = sum(f["rows"] for f in state.files)
        positives = state.positives if label == self.label else sum(
            _label_sum(pq.read_table(self.tmp / f["path"], columns=[label]).column(0)) for f in state.files if f["rows"])
        return {"rows": rows, "positive_rate": positives / rows if rows else 0.0,
                "files": [dict(f) for f in state.files]}

    def _move_into_place(self) -> None:
        out = self.out
        old = None
        if out.exists():
            if (out / MANIFEST).exists():
                if not self.overwrite:  # someone finished the same folder while we worked
                    raise DataError(f"output {out} already holds a data set; pass --overwrite to replace it")
                old = out.with_name(f"{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                os.rename(out, old)
            elif any(out.iterdir()):
                raise DataError(f"output {out} exists, is not empty and is not a wdl data set; refusing to touch it")
        try:
            os.rename(self.tmp, out)  # replaces an empty folder, fails on a non-empty one
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        self._done = True  # the new data set is in place: nothing below may undo that
        try:
            _fsync(out.parent)
        except OSError:
            pass
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder; the target folder is left as it was."""
        for state in self._splits.values():
            if state.part is not None:
                state.part.abandon()
                state.part = None
        # No thread writes into the folder removed below. (Writes abandon() cancelled never run, and
        # wait() never counts a cancelled future as done: waiting on them would hang.)
        wait([done for done, _ in self._backlog if not done.cancelled()])
        self._backlog.clear()
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise DataError(f"data set writer for {self.out} is already committed or aborted")

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving the block without commit() (exception or not) must not leave a temp folder.
        if not self._done:
            self.abort()


def _schema_str(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _label_sum(col) -> float:
    return float(pc.sum(col.cast(pa.float64())).as_py() or 0.0)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
