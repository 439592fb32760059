"""Score raw rows with an exported model (`wdl export`), in any Python process.

    scorer = Scorer.load("exported/movielens")
    p = scorer.score(table)                  # a pyarrow Table with the data set's columns
    p = scorer.score([{"user_id": 3, ...}])  # or a list of dicts; the label is never needed
    p = scorer.score(raw_table, raw=True)    # a model of a `wdl data import` set: the raw rows

An artefact folder holds:

- `model.pt2`: a `torch.export` program (saved with `torch.export.save`) of the model's
  inference function, with a dynamic batch dimension:
      forward(dense [N, D] float32, ids: K x int64 [T_k], offsets: K x int64 [N]) -> [N] probabilities
  one (ids, offsets) pair per sparse key in `encoding.json`'s `sparse_keys` order, in
  `nn.EmbeddingBag`'s layout (offsets[r] = where row r's ids start). The program holds every
  weight and needs neither wdl's model code nor TorchRec to run.
- `encoding.json`: how raw columns become those tensors (see `FORMAT` and wdl.export): the
  label name, every sparse column (mode ids/hash/vocab/buckets, size, bucket edges), the
  crosses (columns, buckets, salt), the dense columns (normalisation, statistics, a null's
  value and whether the model reads a missing indicator for it: D = columns + indicators) and the
  Arrow types of the training data's columns.
- `vocab/<column>.json`: copies of the vocabulary files the encoding names.
- `raw/<column>.json`: for a data set from `wdl data import`, copies of its vocabularies, which
  map the raw values of the imported files to the ids its rows hold (`encoding.json`'s `raw`:
  column -> vocab_file and the separator a raw string was split on). With them `score(rows,
  raw=True)` takes rows as the imported files hold them.

The encoding is wdl's own FeatureSpec, rebuilt from `encoding.json`, so an id is computed
exactly as in training: unknown or out-of-vocabulary values and nulls become id 0, and
`take_unknown_counts` reports how many there were. This module imports neither the trainer
nor TorchRec nor wdl.distributed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from wdl.config import ColumnConfig, CrossConfig, FeaturesConfig
from wdl.data.features import FeatureSpec
from wdl.data.raw_rows import RawRows, numeric_types
from wdl.program_file import check_program_file
from wdl.errors import ArtefactError, ConfigError, DataError, first_line

FORMAT = 1  # encoding.json's "format"; bumped when the layout changes
MODEL_FILE = "model.pt2"
ENCODING_FILE = "encoding.json"


def encoding_spec(enc: dict[str, Any], root: Path, raw: dict[str, dict] | None = None) -> FeatureSpec:
    """The FeatureSpec that `encoding.json` (already parsed) describes; vocab files under `root`.
    raw: `encoding.json`'s `raw`, to read the columns it names as raw values through their
    import vocabularies (the ids are the same: id i is the vocabulary's i-th value)."""
    columns: dict[str, ColumnConfig] = {}
    stats: dict[str, dict[str, float]] = {}
    for name, c in enc["columns"].items():
        mode, n = c["mode"], int(c["num_embeddings"])
        if raw and name in raw:
            columns[name] = ColumnConfig(kind=c["kind"], vocab_file=raw[name]["vocab_file"])
        elif mode == "ids":
            columns[name] = ColumnConfig(kind=c["kind"], vocab_size=n)
        elif mode == "hash":
            columns[name] = ColumnConfig(kind=c["kind"], hash_buckets=n)
        elif mode == "vocab":
            columns[name] = ColumnConfig(kind=c["kind"], vocab_file=c["vocab_file"])
        elif mode == "buckets":
            columns[name] = ColumnConfig(kind="dense", buckets=[float(e) for e in c["edges"]])
        else:
            raise ArtefactError(f"{root / ENCODING_FILE}: column {name!r} has an unknown mode {mode!r}")
    for d in enc["dense"]:
        # A dense column may also be bucketed (a sparse key): one config entry serves both uses.
        col = columns.setdefault(d["name"], ColumnConfig(kind="dense"))
        col.normalize, col.fill = d["normalize"], float(d["fill"])
        # An artefact written before missing indicators has none (its model reads none).
        stats[d["name"]] = {"mean": float(d["mean"]), "std": float(d["std"]),
                            "missing_train": int(bool(d.get("missing_indicator")))}
    crosses = {k: CrossConfig(columns=list(c["columns"]), hash_buckets=int(c["buckets"])) for k, c in enc["crosses"].items()}
    cfg = FeaturesConfig(label=enc["label"], columns=columns, crosses=crosses)
    spec = FeatureSpec(cfg, stats, list(enc["sparse_keys"]), [d["name"] for d in enc["dense"]], root=root)
    # The salt is derived from the cross's name; a mismatch means another hashing than training's.
    for k, c in spec.crosses.items():
        if c.salt != int(enc["crosses"][k]["salt"]):
            raise ArtefactError(f"{root / ENCODING_FILE}: cross {k!r} has salt {enc['crosses'][k]['salt']}, "
                                f"this wdl computes {c.salt}")
    for name, c in enc["columns"].items():
        if spec.sparse[name].num_embeddings != int(c["num_embeddings"]):
            raise ArtefactError(f"{root / ENCODING_FILE}: column {name!r} has {spec.sparse[name].num_embeddings} "
                                f"ids here, {c['num_embeddings']} when exported")
    return spec


def model_inputs(spec: FeatureSpec, table: pa.Table) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Encoded rows as the exported program's inputs: (dense [N, D], ids per key, offsets per key)."""
    ft = spec.encode(table, "rows")
    ids, offsets = [], []
    for key in spec.sparse_keys:
        jag = ft.sparse[key]
        ids.append(jag.values)
        offsets.append(jag.offsets())
    return ft.dense, ids, offsets


class Scorer:
    """An exported model with its feature encoding.

    score: N raw rows -> numpy float32 [N] probabilities.
    """

    def __init__(self, program: Any, spec: FeatureSpec, schema: pa.Schema, root: Path,
                 raw: RawRows | None = None) -> None:
        self.program, self.spec, self.schema, self.root, self.raw = program, spec, schema, root, raw
        for s in (spec, raw):
            if s is not None:
                s.has_labels = False  # scoring never reads a label, so rows may come without one

    @classmethod
    def load(cls, path: str | Path) -> "Scorer":
        root = Path(path)
        if not root.is_dir():
            raise ArtefactError(f"{root}: not an exported model folder (no such folder)")
        for name in (ENCODING_FILE, MODEL_FILE):
            if not (root / name).is_file():
                raise ArtefactError(f"{root}: not an exported model folder (no {name}; write one with wdl export)")
        try:
            enc = json.loads((root / ENCODING_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ArtefactError(f"{root / ENCODING_FILE}: cannot read it: {str(e).splitlines()[0]}") from None
        if not isinstance(enc, dict) or enc.get("format") != FORMAT:
            raise ArtefactError(f"{root / ENCODING_FILE}: format {enc.get('format') if isinstance(enc, dict) else None}, "
                                f"this wdl reads format {FORMAT}")
        try:
            spec = encoding_spec(enc, root)
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(enc["arrow_schema"])))
            raw = None
            if enc.get("raw"):
                raw_spec = encoding_spec(enc, root, enc["raw"])
                raw = RawRows(raw_spec, enc["raw"], numeric_types(raw_spec, schema))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtefactError(f"{root / ENCODING_FILE}: incomplete or malformed ({type(e).__name__}: {e})") from None
        except (DataError, ConfigError) as e:  # e.g. a vocabulary file that cannot be read
            raise ArtefactError(f"{root}: {e}") from None
        check_program_file(root / MODEL_FILE)  # torch.export.load runs what a crafted file asks it to
        try:
            program = torch.export.load(root / MODEL_FILE).module()
        except Exception as e:  # a truncated or foreign file: torch raises many kinds
            raise ArtefactError(f"{root / MODEL_FILE}: cannot load it ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(program, spec, schema, root, raw)

    def score(self, rows: pa.Table | pa.RecordBatch | Sequence[dict[str, Any]], *, raw: bool = False) -> np.ndarray:
        """Probabilities of `rows`: as the training data set holds them (its ids), or with
        raw=True as the files `wdl data import` read (raw values, mapped here through the
        import's vocabularies; only for a model of an imported data set)."""
        if raw and self.raw is None:
            raise DataError(f"{self.root}: raw=True needs a model trained on a data set from `wdl data import` "
                            "(its vocabularies map raw values to ids); score this model's rows as its data set "
                            "holds them (raw=False)")
        spec = self.raw if raw else self.spec
        table = self._table(rows, raw)
        if not raw:  # numbers in the data set's types: a float64 4.99 buckets as the stored float32 did
            for i, f in enumerate(table.schema):
                want = self.schema.field(f.name).type if f.name in self.schema.names else None
                if want is not None and want != f.type and pa.types.is_floating(want) and (
                        pa.types.is_floating(f.type) or pa.types.is_integer(f.type)):
                    table = table.set_column(i, f.name, table.column(i).cast(want))
        if table.num_rows == 0:
            return np.zeros(0, dtype=np.float32)
        spec.check_schema(table.schema, "rows")
        dense, ids, offsets = model_inputs(spec, table)
        with torch.inference_mode():
            return self.program(dense, ids, offsets).numpy().astype(np.float32, copy=False)

    def take_unknown_counts(self) -> dict[str, dict[str, int]]:
        """Unknown and missing values per vocabulary column since the last call (FeatureSpec's),
        raw and encoded rows together."""
        out = self.spec.take_unknown_counts()
        for name, c in (self.raw.take_unknown_counts() if self.raw is not None else {}).items():
            mine = out.setdefault(name, dict.fromkeys(c, 0))
            for k, v in c.items():
                mine[k] += v
        return out

    def _table(self, rows: Any, raw: bool) -> pa.Table:
        if isinstance(rows, pa.RecordBatch):
            return pa.Table.from_batches([rows])
        if isinstance(rows, pa.Table):
            return rows
        rows = list(rows)
        if not all(isinstance(r, dict) for r in rows):
            raise DataError("rows: give a pyarrow Table or a list of dicts (column -> raw value)")
        schema = None  # raw rows: a dict's values typed as Arrow infers them (RawRows casts the vocabularies)
        if not raw:
            # The training data's Arrow types, so a dict's Python values convert as the Parquet
            # columns did (an absent key in one row is a null, as in a Parquet file).
            needed = [f for f in self.schema if f.name in self.spec.columns]
            seen = set().union(*rows) if rows else set()
            missing = [f.name for f in needed if f.name not in seen]
            if rows and missing:
                raise DataError(f"rows: no row has column {missing[0]!r} (needed: {', '.join(f.name for f in needed)})")
            schema = pa.schema(needed)
        try:
            return pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            raise DataError(f"rows: {first_line(e)}") from None
