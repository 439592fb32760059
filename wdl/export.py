"""`wdl export`: a trained run as a self-contained artefact folder for serving (see wdl.serve).

    wdl export runs/NAME --out exported/NAME [--checkpoint best|latest|PATH]

The model is rebuilt in one process exactly as `wdl predict` rebuilds it (whatever backend and
world size trained it: the checkpoint is resharded to one rank on load), its weights loaded,
and every table read out whole: wdl's fused groups are sliced at their per-feature row
offsets, TorchRec's tables reassembled from their shards' offsets. Those tables and the dense
layers go into `InferenceModel`, a plain-PyTorch module whose forward takes only tensors, which
`torch.export` turns into a program with a dynamic batch dimension (`model.pt2`). torch.export
rather than TorchScript: it is PyTorch's supported path, and the saved program runs without
wdl's model code. The feature encoding goes to `encoding.json` (wdl.serve documents both).
"""

from __future__ import annotations

import argparse
import base64
import copy
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wdl.data.raw_rows import raw_vocabularies
from wdl.errors import ConfigError
from wdl.serve import ENCODING_FILE, FORMAT, MODEL_FILE, Scorer


class InferenceModel(nn.Module):
    """The trained model's scoring function over plain tensors.

    keys: the K sparse keys, in the order of the inputs.
    wide: key -> [rows, 1] table, and wide_bias [1] (None: no wide part, `bias` [1] instead).
    deep: key -> [rows, dim] table, in the deep part's concatenation order; mlp and interaction
        as trained (dropout left out: it is the identity in evaluation). The dense features
        (D of them, maybe 0) feed the MLP as in training.

    forward(dense [N, D] float32, ids: K x int64 [T_k], offsets: K x int64 [N]) -> [N] probabilities
    """

    def __init__(self, keys: list[str], wide: dict[str, Tensor] | None, wide_bias: Tensor | None,
                 deep: dict[str, Tensor] | None, mlp: nn.Module | None,
                 interaction: nn.Module | None, bias: Tensor | None) -> None:
        super().__init__()
        self.wide_keys = [keys.index(k) for k in wide] if wide is not None else None
        self.deep_keys = [keys.index(k) for k in deep] if deep is not None else None
        for i, t in enumerate((wide or {}).values()):
            self.register_buffer(f"wide_{i}", t.detach().clone())
        for i, t in enumerate((deep or {}).values()):
            self.register_buffer(f"deep_{i}", t.detach().clone())
        self.register_buffer("wide_bias", wide_bias.detach().clone().view(1) if wide_bias is not None else None)
        self.register_buffer("bias", bias.detach().clone().view(1) if bias is not None else None)
        self.mlp, self.interaction = mlp, interaction

    def forward(self, dense: Tensor, ids: list[Tensor], offsets: list[Tensor]) -> Tensor:
        logit = None
        if self.wide_keys is not None:
            pooled = [F.embedding_bag(ids[k], getattr(self, f"wide_{i}"), offsets[k], mode="sum")
                      for i, k in enumerate(self.wide_keys)]
            logit = torch.stack(pooled).sum(0).view(-1) + self.wide_bias
        if self.deep_keys is not None:
            parts, pairwise = [], None
            if self.deep_keys:
                emb = torch.cat([F.embedding_bag(ids[k], getattr(self, f"deep_{i}"), offsets[k], mode="sum")
                                 for i, k in enumerate(self.deep_keys)], dim=1)
                parts.append(emb)
                if self.interaction is not None:
                    pairwise = self.interaction(emb)
            if dense.shape[1]:  # static: the dense width is fixed when exporting
                parts.append(dense)
            if pairwise is not None and self.interaction.kind == "dot":
                parts.append(pairwise)
            deep = self.mlp(torch.cat(parts, dim=1)).squeeze(1)
            if pairwise is not None and self.interaction.kind == "fm":
                deep = deep + pairwise
            logit = deep + self.bias if logit is None else logit + deep
        return torch.sigmoid(logit)


def export_main(args: argparse.Namespace) -> int:
    from wdl.config import load_config
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.distributed.env import close_distributed, init_distributed
    from wdl.predict import load_trained_model, output_path, pick_checkpoint, refuse_torchrun, run_folder
    from wdl.train import run_log

    run = run_folder(args, "export")
    out = output_path(args.out, folder=True)
    if out == Path.cwd() or out in Path.cwd().parents:
        raise ConfigError(f"--out {args.out}: the export replaces that folder, and this shell is in it; give a new folder")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / ENCODING_FILE).is_file())):
        raise ConfigError(f"--out {out}: exists and is not an exported model folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not getattr(args, "overwrite", False):
        raise ConfigError(f"--out {out}: an exported model is already there; add --overwrite to replace it")
    refuse_torchrun("wdl export runs in one process (it reads every table whole)")
    cfg = load_config(run / "config.yaml")
    ckpt = pick_checkpoint(run, cfg, args.checkpoint)
    cfg = _one_cpu_process(cfg)
    # TorchRec's and torch's warnings (DCP loading TorchRec's ShardedTensor tables is deprecated
    # upstream) are nothing a user of wdl can act on: kept off the console, as predict does.
    run_log.capture()
    env = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)  # cpu: the artefact is a CPU program
    try:
        manifest = open_dataset(cfg.data)  # ids and statistics of training
        spec = feature_spec(cfg, manifest)
        placed = load_trained_model(cfg, spec, env, ckpt)
        module = inference_model(placed.state_module, spec.sparse_keys)
        schema = pq.read_schema(manifest.split(cfg.data.train_split).files[0].path)
        # Written beside the old export and swapped in whole: a kill at any point leaves one of
        # them complete under --out (and at worst a stray OUT.tmp-* folder).
        tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True)
        try:
            write_artefact(tmp, module, spec, cfg.features, manifest.root, schema, raw_vocabularies(manifest, spec))
            Scorer.load(tmp)  # what was written loads, before it replaces anything
            _swap_in(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old export
        print(f"wdl: exported {ckpt} -> {out} ({MODEL_FILE}, {ENCODING_FILE})", flush=True)
        if cfg.model.deep.precision == "bf16":
            # The program's MLP is float32: it scores as the bf16-trained weights do in float32,
            # up to about 1e-3 from wdl predict, which runs the MLP in bf16 as training did.
            print("wdl: note: model.deep.precision=bf16: the exported MLP runs in float32, so its scores differ "
                  "from wdl predict's (bf16) by up to about 1e-3", file=sys.stderr, flush=True)
    finally:
        run_log.release()
        close_distributed()
    return 0


def _swap_in(new: Path, out: Path) -> None:
    """Put folder `new` at `out`; an earlier folder at `out` ends up at `new`. Linux exchanges
    the two in one step (renameat2 RENAME_EXCHANGE); elsewhere, or on a file system without it,
    the old one is renamed aside first (a kill in between leaves it complete as OUT.old-*)."""
    if not out.exists() or not any(out.iterdir()):
        new.replace(out)  # onto nothing, or onto an empty folder
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(out), rename_exchange) == 0:
        return
    aside = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
    out.rename(aside)
    new.rename(out)
    aside.rename(new)


def _one_cpu_process(cfg):
    """The run's config as one CPU process can rebuild it. Where tables were placed and how
    TorchRec's tables were updated are not part of the weights (the checkpoint is resharded on
    load, and no optimiser state is read), so a run trained on GPUs with CUDA-only sharding or
    FBGEMM's GPU-only Adam is rebuilt with TorchRec's CPU choices and plain SGD (which FBGEMM
    has everywhere)."""
    distributed = dataclasses.replace(cfg.distributed, sharding="auto", tables={})
    optim = cfg.optim
    if cfg.model.embedding_backend != "torch":
        optim = dataclasses.replace(cfg.optim, deep=dataclasses.replace(
            cfg.optim.deep, name="sgd", weight_decay=0.0, initial_accumulator_value=0.0))
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cpu"), distributed=distributed, optim=optim)


@torch.no_grad()
def inference_model(state_module: nn.Module, keys: list[str]) -> InferenceModel:
    """The loaded model's weights, whole, in an InferenceModel (one process holds every row)."""
    from wdl.model.embeddings import FusedEmbeddingBags
    from wdl.model.wide_deep import ByteDropout, WideDeep

    model = next(m for m in state_module.modules() if isinstance(m, WideDeep))
    wide = wide_bias = deep = mlp = interaction = None
    if model.wide is not None:
        group = model.wide.embeddings
        wide = group.weights()
        wide_bias = group.rows.weight[group.bias_row]
    if model.deep is not None:
        emb = model.deep.embeddings
        if emb is None:
            deep = {}
        elif isinstance(emb, FusedEmbeddingBags):
            deep = emb.weights()
        else:
            deep = _torchrec_tables(emb)
        deep = {f: deep[f] for f in model.deep.features}  # the concatenation order of training
        mlp = nn.Sequential(*[copy.deepcopy(m) for m in model.deep.mlp if not isinstance(m, ByteDropout)])
        interaction = copy.deepcopy(model.deep.interaction)
    m = InferenceModel(keys, wide, wide_bias, deep, mlp, interaction, model.bias)
    return m.eval().requires_grad_(False)


def _torchrec_tables(emb: nn.Module) -> dict[str, Tensor]:
    """TorchRec's tables, whole: each from its local shards (every shard is local at world size
    1), placed at the shard's (row, column) offsets."""
    state = emb.ebc.state_dict()
    out = {}
    for t in emb.tables:
        value = state[f"embedding_bags.{t.name}.weight"]
        if hasattr(value, "local_shards"):  # ShardedTensor
            full = torch.full((t.num_embeddings, t.dim), float("nan"))
            for shard in value.local_shards():
                r, c = shard.metadata.shard_offsets
                h, w = shard.tensor.shape
                full[r:r + h, c:c + w] = shard.tensor.cpu()
            if full.isnan().any():
                raise RuntimeError(f"table {t.name}: its shards do not cover it in one process")
        elif hasattr(value, "full_tensor"):  # DTensor
            full = value.full_tensor().cpu()
        else:
            full = value.cpu()
        out[t.feature] = full.float()
    return out


def write_artefact(folder: Path, module: InferenceModel, spec, features_cfg, data_root: Path, schema,
                   raw: dict[str, dict[str, Any]] | None = None) -> None:
    """model.pt2 (the exported program), encoding.json, copies of the vocabulary files, and of
    the import's vocabularies (`raw`, see raw_vocabularies) under raw/."""
    dense = torch.zeros(3, spec.dense_dim)
    ids, offsets, dyn_ids = [], [], []
    for i, key in enumerate(spec.sparse_keys):
        # Example lengths differ from the batch size and from one another, so torch.export keeps
        # every size symbolic (a hint shared by two sizes could tie them together).
        ids.append(torch.zeros(5 + i, dtype=torch.int64))
        offsets.append(torch.tensor([0, 2, 4], dtype=torch.int64))
        dyn_ids.append({0: torch.export.Dim(f"ids_{i}", min=0)})
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(module, (dense, ids, offsets), dynamic_shapes={
        "dense": {0: batch}, "ids": dyn_ids, "offsets": [{0: batch}] * len(offsets)})
    torch.export.save(program, folder / MODEL_FILE)

    columns = {}
    for name, sc in spec.sparse.items():
        c = {"kind": sc.kind, "mode": sc.mode, "num_embeddings": sc.num_embeddings}
        if sc.mode == "vocab":
            src = Path(features_cfg.columns[name].vocab_file)
            src = src if src.is_absolute() else data_root / src
            (folder / "vocab").mkdir(exist_ok=True)
            shutil.copyfile(src, folder / "vocab" / f"{name}.json")
            c["vocab_file"] = f"vocab/{name}.json"
        if sc.mode == "buckets":
            c["edges"] = [float(e) for e in sc.edges]
        columns[name] = c
    raw_encoding = {}
    for name, r in (raw or {}).items():
        (folder / "raw").mkdir(exist_ok=True)
        shutil.copyfile(r["vocab_file"], folder / "raw" / f"{name}.json")
        raw_encoding[name] = {"vocab_file": f"raw/{name}.json", "separator": r["separator"]}
    used = set(spec.columns) | {spec.label}
    encoding = {
        "format": FORMAT,
        "label": spec.label,
        "sparse_keys": list(spec.sparse_keys),
        "columns": columns,
        "crosses": {k: {"columns": c.columns, "buckets": c.buckets, "salt": c.salt} for k, c in spec.crosses.items()},
        # fill: a null's raw value; missing_indicator: the model also reads 1.0 for a null (after
        # every column's value, in this order)
        "dense": [{"name": d.name, "normalize": d.normalize, "mean": d.mean, "std": d.std, "fill": d.fill,
                   "missing_indicator": d.indicator} for d in spec.dense],
        # Raw values -> ids as `wdl data import` mapped them (score(rows, raw=True)); {} if not imported.
        "raw": raw_encoding,
        # The Arrow types of the columns read, so wdl.serve converts a dict's values as Parquet did.
        "arrow_schema": base64.b64encode(pa.schema([f for f in schema if f.name in used]).serialize().to_pybytes()).decode(),
        "inputs": "forward(dense [N, D] float32, ids: K x int64 [T_k], offsets: K x int64 [N]) -> [N] "
                  "probabilities; one (ids, offsets) per sparse_keys entry, nn.EmbeddingBag's layout",
    }
    (folder / ENCODING_FILE).write_text(json.dumps(encoding, indent=1) + "\n")
