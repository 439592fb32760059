"""Criteo TSV: read a file (plain or gzip) in blocks of whole lines and parse a block, vectorised.

A line is `label \\t I1..I13 \\t C1..C26`: a 0/1 label, 13 integer counts and 26 categorical
values written as 8 hex digits (32-bit hashes); any field but the label may be empty (missing).
Blocks are cut by the reading process only at line ends and carry the number of their first
line, so a worker can parse a block on its own and still name `file:line` in errors.

Parsing goes through pyarrow.csv with every column read as a string, then per column:
hex digits through a byte lookup table, dense values through an Arrow cast. Nothing runs
per row in Python, so a bad line costs the same as a good one until it is reported.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from wdl.errors import DataError, clip

DENSE = [f"I{i}" for i in range(1, 14)]
CATEGORICAL = [f"C{i}" for i in range(1, 27)]
FIELDS = ["label", *DENSE, *CATEGORICAL]
NEWLINE = b"\n"
BLOCK_BYTES = 8 << 20  # text handed to one parse call; bounds a worker's memory

# Reasons a line is bad, in the order they are checked.
REASONS = ("field_count", "label", "dense", "categorical", "encoding")

_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)  # nibble weights of 8 hex digits, most significant first


# ---------------------------------------------------------------------------------- reading
@dataclass
class Block:
    """Whole lines of one input file."""

    path: str
    file_index: int
    first_line: int  # 1-based number of the block's first line in its file
    lines: int
    data: bytes
    raw_bytes: int  # bytes of the file on disk consumed by this block (for progress)


def open_input(path: str):
    """(text stream, raw file) of a plain or gzip file; gzip is recognised by its magic bytes."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read input {path}: {e.strerror}") from None
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    raw.seek(0)
    return raw, raw


def iter_blocks(path: str, file_index: int = 0, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The file as blocks of whole lines; a truncated or corrupt gzip stream is a DataError
    naming the last complete line read."""
    stream, raw = open_input(path)
    line, carry, pos = 1, b"", 0
    try:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (EOFError, OSError, zlib.error) as e:
                done = _lines_before_damage(path) if line == 1 and not carry else line - 1 + carry.count(NEWLINE)
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"{path}: truncated or corrupt gzip data after line {done} ({reason})") from None
            new_pos = raw.tell()
            if not chunk:
                if carry:  # a last line without a newline
                    yield Block(path, file_index, line, 1, carry, new_pos - pos)
                elif line == 1:
                    raise DataError(f"{path}: input file is empty (no lines)")
                return
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            n = data.count(b"\n", 0, cut)
            yield Block(path, file_index, line, n, data[:cut], new_pos - pos)
            pos, line, carry = new_pos, line + n, data[cut:]
    finally:
        stream.close()
        raw.close()


def _lines_before_damage(path: str) -> int:
    """Complete lines readable before a gzip stream breaks, read in small pieces (a large first
    read fails before returning anything, which would name line 0)."""
    stream, raw = open_input(path)
    lines = 0
    try:
        while chunk := stream.read(1 << 16):
            lines += chunk.count(NEWLINE)
    except (EOFError, OSError, zlib.error):
        pass
    finally:
        stream.close()
        raw.close()
    return lines


def count_lines(path: str) -> int:
    return sum(b.lines for b in iter_blocks(path))


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Parsed:
    """The good lines of a block. n rows:

    lines [n] int64 (1-based line numbers), label [n] int8, dense [n, 13] float64 (NaN = missing),
    cat [n, 26] uint32, cat_missing [n, 26] bool; bad: reason -> count; first_bad: the first
    few (line, message) in line order.
    """

    lines: np.ndarray
    label: np.ndarray
    dense: np.ndarray
    cat: np.ndarray
    cat_missing: np.ndarray
    bad: dict[str, int] = field(default_factory=dict)
    first_bad: list[tuple[int, str]] = field(default_factory=list)


_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
MAX_EXAMPLES = 20


def parse_block(block: Block) -> Parsed:
    wrong_count: list[tuple[int, str]] = []
    data, not_utf8 = _blank_non_utf8(block.data, block.first_line)

    def on_invalid(row) -> str:  # called for lines whose field count is not 40
        wrong_count.append((block.first_line + row.number - 1,
                            f"{row.actual_columns} fields, expected {len(FIELDS)}"))
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(column_names=FIELDS, use_threads=False,
                                           block_size=max(len(block.data) + 1, 1 << 16)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             ignore_empty_lines=False, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in FIELDS},
                                                 strings_can_be_null=True, null_values=[""]),
        )
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise DataError(f"{block.path}: cannot parse lines {block.first_line}-{block.first_line + block.lines - 1} "
                        f"as TSV ({clip(str(e).splitlines()[0])})") from None
    n = table.num_rows
    # Line number of every parsed row: the block's lines minus those skipped for their field count.
    skipped = np.array([ln for ln, _ in wrong_count], dtype=np.int64) - block.first_line
    lines = np.delete(np.arange(block.lines, dtype=np.int64), skipped)[:n] + block.first_line
    bad = np.zeros(n, dtype=np.int8)  # 0 = good, else 1 + index into REASONS
    notes: dict[int, str] = {}  # row -> message, for the first bad rows only

    def mark(mask: np.ndarray, reason: str, message) -> None:
        new = mask & (bad == 0)
        if new.any():
            bad[new] = 1 + REASONS.index(reason)
            for r in np.flatnonzero(new)[:MAX_EXAMPLES]:
                notes.setdefault(int(r), message(int(r)))

    if not_utf8:  # blanked lines came through as empty rows
        mark(np.isin(lines, np.array(sorted(not_utf8), dtype=np.int64)), "encoding", lambda r: "not valid UTF-8 text")
    label_col = table.column("label").combine_chunks()
    label_f = _to_float(label_col)
    label_ok = (label_f == 0) | (label_f == 1)
    mark(~label_ok, "label", lambda r: f"label {clip(repr(label_col[r].as_py()))} is not 0 or 1")

    dense = np.empty((n, len(DENSE)), dtype=np.float64)
    for j, name in enumerate(DENSE):
        col = table.column(name).combine_chunks()
        x = _to_float(col)
        missing = col.is_null().to_numpy(zero_copy_only=False)
        broken = ~missing & ~np.isfinite(x)
        mark(broken, "dense", lambda r, col=col, name=name: f"{name} value {clip(repr(col[r].as_py()))} is not a finite number")
        dense[:, j] = np.where(missing, np.nan, x)

    cat = np.zeros((n, len(CATEGORICAL)), dtype=np.uint32)
    cat_missing = np.zeros((n, len(CATEGORICAL)), dtype=bool)
    for j, name in enumerate(CATEGORICAL):
        col = table.column(name).combine_chunks()
        values, missing, broken = _hex32(col)
        mark(broken, "categorical",
             lambda r, col=col, name=name: f"{name} value {clip(repr(col[r].as_py()))} is not 8 hex digits")
        cat[:, j], cat_missing[:, j] = values, missing

    counts = {reason: int((bad == i + 1).sum()) for i, reason in enumerate(REASONS)}
    counts["field_count"] = len(wrong_count)
    examples = sorted(wrong_count[:MAX_EXAMPLES] + [(int(lines[r]), m) for r, m in notes.items()])[:MAX_EXAMPLES]
    keep = bad == 0
    return Parsed(lines[keep], label_f[keep].astype(np.int8), dense[keep], cat[keep], cat_missing[keep],
                  {k: v for k, v in counts.items() if v}, examples)


def _blank_non_utf8(data: bytes, first_line: int) -> tuple[bytes, set[int]]:
    """The block with every line that is not UTF-8 emptied (the CSV reader would fail the whole
    block; an empty line reads as a row of nulls, marked bad by its line number), and those
    lines' numbers."""
    if data.isascii():
        return data, set()
    try:
        data.decode("utf-8")
        return data, set()
    except UnicodeDecodeError:
        pass
    lines, bad = data.split(b"\n"), set()
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            lines[i], _ = b"", bad.add(first_line + i)
    return b"\n".join(lines), bad


def _to_float(col: pa.Array) -> np.ndarray:
    """float64 values of a string column; null and unparsable -> NaN."""
    try:
        x = pc.cast(col, pa.float64())
    except pa.ArrowInvalid:  # some value is not a number: null those and cast the rest
        ok = pc.match_substring_regex(col, _NUMBER)
        x = pc.cast(pc.if_else(ok, col, pa.scalar(None, pa.string())), pa.float64())
    return pc.fill_null(x, float("nan")).to_numpy(zero_copy_only=False)


def _rep(byte: int) -> np.uint64:
    return np.uint64(byte * 0x0101010101010101)


_HIGH = _rep(0x80)


def _hex32(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint32 values, missing, broken) of a column of 8-hex-digit strings.

    Each 8-character value is loaded as one little-endian uint64 straight from the Arrow data
    buffer (an overlapping strided view, no copy) and checked and decoded with bytewise
    arithmetic on the whole word (SWAR): no per-row Python and no per-byte gathers.
    """
    n = len(col)
    missing = col.is_null().to_numpy(zero_copy_only=False)
    values = np.zeros(n, dtype=np.uint32)
    if n == 0 or missing.all():
        return values, missing, np.zeros(n, dtype=bool)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + n + 1]
    buf = col.buffers()[2]
    eight = (np.diff(offsets) == 8) & ~missing
    if buf is None or buf.size < 8:
        return values, missing, ~missing
    words_at = np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, offset=0, strides=(1,))
    w = words_at[offsets[:-1][eight]]
    with np.errstate(over="ignore"):
        # bytewise b >= lo is bit 7 of b + (0x80 - lo); b <= hi is bit 7 clear in b + (0x7F - hi)
        # (no carries between bytes once bytes >= 0x80 are ruled out)
        ascii_ = (w & _HIGH) == 0
        low = w | _rep(0x20)  # 'A'-'F' -> 'a'-'f'
        digit = ((w + _rep(0x80 - 0x30)) & ~(w + _rep(0x7F - 0x39))) & _HIGH
        alpha = ((low + _rep(0x80 - 0x61)) & ~(low + _rep(0x7F - 0x66))) & _HIGH
        ok = ascii_ & ((digit | alpha) == _HIGH)
        nib = (w & _rep(0x0F)) + ((w >> np.uint64(6)) & _rep(0x01)) * np.uint64(9)  # per byte 0..15
        # byte k holds digit k (most significant first): fold pairs, then quads, then halves
        x = ((nib & np.uint64(0x000F000F000F000F)) << np.uint64(4)) | ((nib >> np.uint64(8)) & np.uint64(0x000F000F000F000F))
        x = ((x & np.uint64(0x000000FF000000FF)) << np.uint64(8)) | ((x >> np.uint64(16)) & np.uint64(0x000000FF000000FF))
        x = ((x & np.uint64(0xFFFF)) << np.uint64(16)) | ((x >> np.uint64(32)) & np.uint64(0xFFFF))
    values[eight] = np.where(ok, x, 0).astype(np.uint32)
    broken = ~missing & ~eight
    broken[np.flatnonzero(eight)[~ok]] = True
    return values, missing, broken


def format_hex32(values: np.ndarray) -> np.ndarray:
    """uint32 -> array of 8-byte lowercase hex strings (numpy 'S8'), vectorised."""
    v = np.asarray(values, dtype=np.uint32)
    nib = (v[:, None] >> _SHIFTS) & np.uint32(15)
    return np.frombuffer(np.frombuffer(b"0123456789abcdef", np.uint8)[nib].tobytes(), dtype="S8")


def input_size(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)
