"""Load and validate a `wdl` dataset folder (see docs/dataset-format.md)."""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

from wdl.errors import DataError, clip, first_line

FORMAT = "wdl-dataset/1"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardFile:
    path: pathlib.Path  # absolute
    rows: int
    row_groups: int


@dataclass(frozen=True)
class SplitFiles:
    rows: int
    positive_rate: float
    files: list[ShardFile]


@dataclass(frozen=True)
class Manifest:
    root: pathlib.Path
    name: str
    label: str
    columns: dict[str, dict]
    splits: dict[str, SplitFiles]
    raw: dict  # the whole manifest.json, for keys only some sources write

    def split(self, name: str) -> SplitFiles:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(f"data set {self.root} has no split {name!r} "
                            f"(available: {', '.join(sorted(self.splits)) or 'none'})") from None

    @property
    def identity(self) -> str:
        """A hash of the whole manifest (every shard, row count, vocabulary and statistic): what a
        checkpoint records of the data set it was trained on."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]

    def vocab_path(self, column: str) -> pathlib.Path | None:
        rel = self.columns.get(column, {}).get("vocab_file")
        return self.root / rel if rel else None


def load_manifest(root) -> Manifest:
    """Read DIR/manifest.json, check it and that every listed shard exists."""
    root = pathlib.Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"data set folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data set path {root} is not a folder")
    path = root / MANIFEST
    if not path.is_file():
        tmp = sorted(p.name for p in root.parent.glob(f"{root.name}.tmp-*"))
        hint = f"; {tmp[0]} next to it looks like an interrupted preparation, prepare again" if tmp else ""
        raise DataError(f"{root} is incomplete or not a wdl data set (no manifest.json){hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a JSON object")
    if raw.get("format") != FORMAT:
        raise DataError(f"{path} has format {clip(repr(raw.get('format')))}, expected {FORMAT!r}")

    try:
        splits = {name: _split(root, name, s) for name, s in raw["splits"].items()}
        label, columns = raw["label"], raw["columns"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is malformed ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(label, str) or not isinstance(columns, dict):
        raise DataError(f"{path} is malformed (label must be a string, columns an object)")
    for name, entry in columns.items():
        if not isinstance(entry, dict) or "kind" not in entry:
            raise DataError(f"{path}: column {clip(repr(name))} has no kind")
    return Manifest(root=root, name=str(raw.get("name", root.name)), label=label,
                    columns=columns, splits=splits, raw=raw)


def _split(root: pathlib.Path, name: str, entry: dict) -> SplitFiles:
    files = []
    for f in entry["files"]:
        path = (root / f["path"]).resolve()
        if not path.is_relative_to(root.resolve()):
            raise DataError(f"{root / MANIFEST}: shard path {clip(repr(f['path']))} points outside the data set")
        if not path.is_file():
            raise DataError(f"data set {root}: shard {clip(str(f['path']))} of split {clip(repr(name))} is missing")
        files.append(ShardFile(path=root / f["path"], rows=int(f["rows"]), row_groups=int(f["row_groups"])))
    return SplitFiles(rows=int(entry["rows"]), positive_rate=float(entry["positive_rate"]), files=files)
