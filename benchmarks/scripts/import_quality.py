"""Is the training config that `wdl data import` prints a good model? Trained as printed on a
planted set that a user brings as plain Parquet:

    python -m benchmarks.scripts.import_quality --data DIR [--work /tmp/wdl-import-quality] [--threads 1] [--out RESULTS_DIR]

DIR is a set written by `wdl data generate --profile criteo|movielens --valid-fraction 0.1
--test-fraction 0.1` (its labels come from a known logistic model, wdl/ingest/planted.py). The
script
1. writes its train, valid and test rows as plain Parquet files (WORK/raw/{train,valid,test}.parquet):
   the label and the feature columns only, no manifest, no `bayes_p`; a Criteo-shaped set's ids
   (rank + 1, 0 = missing) become strings with nulls for missing, and its log1p numbers the
   counts they came from (expm1, rounded), as a raw log holds them;
2. imports them as a user would: `wdl data import --split files --train-files .. --valid-files ..
   --test-files .. --label label --out WORK/imported` (kinds inferred);
3. trains the config the import printed (WORK/imported/train-config.yaml) as printed, in one
   process: `wdl train --config .. run.out_dir=WORK/runs train.threads=N`;
4. reports the test AUC (of the epoch chosen on valid) and the share of the gap closed,
   (AUC - LR) / (ceiling - LR), with LR and the ceiling from the planted-ceiling result of the same
   profile (benchmarks/results/cpu-x86_64-2c/planted-ceiling-2026-11-28/<profile>-1m/results.json:
   logistic regression with the true crosses, and the planted model's own form, each trained on the
   same 800k rows) unless --lr-auc / --ceiling-auc give them; and the crosses the import proposed
   beside the planted ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from benchmarks.machine import ROOT, describe
from benchmarks.results import write_report

CEILING = ROOT / "benchmarks/results/cpu-x86_64-2c/planted-ceiling-2026-11-28"
WDL = [sys.executable, "-m", "wdl.cli"]


def raw_rows(data: Path, raw: Path) -> dict:
    """The planted set's splits as plain Parquet files in `raw`; returns the planted model's record."""
    manifest = json.loads((data / "manifest.json").read_text())
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        t = pq.read_table(data / split)
        t = t.drop([c for c in ("bayes_p",) if c in t.column_names])
        cols = {}
        for name in t.column_names:
            meta, col = manifest["columns"].get(name, {}), t.column(name)
            if meta.get("kind") == "categorical" and manifest["planted"]["profile"] == "criteo":
                col = pc.cast(pc.if_else(pc.equal(col, 0), pa.scalar(None, col.type), col), pa.string())
            elif meta.get("kind") == "dense" and meta.get("transform") == "log1p":
                col = pa.array(np.round(np.expm1(col.to_numpy().astype(np.float64))))
            cols[name] = col
        pq.write_table(pa.table(cols), raw / f"{split}.parquet", row_group_size=131072)
    return manifest["planted"]


def planted_crosses(planted: dict) -> list[list[str]]:
    if planted["profile"] == "criteo":
        return [list(c) for c in planted["model"]["crosses"]]
    return [["gender", "genres"], ["age_bucket", "genres"]]  # wdl/ingest/planted.py's movielens_chunk


def baseline(profile: str) -> tuple[float, float]:
    """Test AUCs of LR with the true crosses and of the planted form, from the planted-ceiling result."""
    r = json.loads((CEILING / f"{profile}-1m/results.json").read_text())
    return r["selected"]["lr"]["test_auc"], r["selected"]["full"]["test_auc"]


def run(cmd: list[str], log) -> tuple[float, str]:
    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - start, p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scripts.import_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a planted set from `wdl data generate` with valid and test splits")
    ap.add_argument("--work", default="/tmp/wdl-import-quality", help="folder for the raw files, the import and the run")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of the one training process")
    ap.add_argument("--lr-auc", type=float, default=None, help="LR's test AUC (default: the planted-ceiling result's)")
    ap.add_argument("--ceiling-auc", type=float, default=None, help="the ceiling's test AUC (default: as for --lr-auc)")
    ap.add_argument("--out", default=None, help="folder for results.json and report.md (default: print only)")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    data, work = Path(args.data), Path(args.work) / Path(args.data).name
    planted = raw_rows(data, work / "raw")
    given = (args.lr_auc, args.ceiling_auc)
    lr_auc, ceiling_auc = given if None not in given else [g or b for g, b in zip(given, baseline(planted["profile"]))]
    imported = work / "imported"
    files = [arg for s in ("train", "valid", "test") for arg in (f"--{s}-files", str(work / "raw" / f"{s}.parquet"))]
    import_s, printed = run([*WDL, "data", "import", "--split", "files", *files, "--label", "label",
                             "--out", str(imported), "--overwrite", "--no-progress"], log)
    log(printed)
    config = imported / "train-config.yaml"
    shutil.rmtree(work / "runs", ignore_errors=True)  # a taken run name would become name-1
    train_s, trained = run([*WDL, "train", "--config", str(config), f"run.out_dir={work / 'runs'}",
                            f"train.threads={args.threads}", "train.progress=false"], log)
    log(trained)
    summary = json.loads((work / "runs" / yaml.safe_load(config.read_text())["run"]["name"] / "summary.json").read_text())
    manifest = json.loads((imported / "manifest.json").read_text())
    auc = summary["test"]["auc"]
    proposed = manifest["proposed_crosses"]["proposed"]
    planted_pairs = planted_crosses(planted)
    found = [p for p in planted_pairs if p in proposed or p[::-1] in proposed]
    r = {"data": str(data), "profile": planted["profile"], "work": str(work), "threads": args.threads,
         "test_auc": auc, "valid_auc": summary["best_auc"], "best_epoch": summary["best_epoch"],
         "epochs_run": summary["epochs"], "lr_auc": lr_auc, "ceiling_auc": ceiling_auc,
         "gap_share": (auc - lr_auc) / (ceiling_auc - lr_auc), "bayes_auc": json.loads((data / "manifest.json").read_text()).get("bayes_optimal_auc"),
         "proposed_crosses": manifest["proposed_crosses"], "planted_crosses": planted_pairs, "planted_found": found,
         "proposed_fm_pairs": manifest.get("proposed_fm_pairs"), "planted_latent": planted["model"].get("latent_interaction"),
         "import_seconds": import_s, "train_seconds": train_s, "config": config.read_text(),
         "import_output": printed, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": describe()}
    command = "python -m benchmarks.scripts.import_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(r, command)
    print(text)
    if args.out:
        write_report(args.out, r, text)
    return 0


def report(r: dict, command: str) -> str:
    pc_ = r["proposed_crosses"]
    ranked = "\n".join(f"| {' x '.join(s['columns'])} | {s['z']:.1f} | {s['df']} | {s['cells']} | "
                       f"{'yes' if s.get('proposed') else ''} |" for s in pc_["ranked"][:10])
    return f"""# Import quality: the printed config, trained as printed ({r['profile']})

- command: `{command}`
- data: {r['data']} re-imported from plain Parquet ({r['work']}/raw), threads {r['threads']}
- import {r['import_seconds']:.0f} s, training {r['train_seconds']:.0f} s ({r['epochs_run']} epochs, best {r['best_epoch']})
- machine: {r['machine']['kind']}, torch {r['machine']['torch']}, git {(r['machine']['git'] or {}).get('commit')}

| | test AUC |
|---|---:|
| LR with the true crosses | {r['lr_auc']:.4f} |
| the printed config (valid {r['valid_auc']:.4f}) | **{r['test_auc']:.4f}** |
| planted form (ceiling) | {r['ceiling_auc']:.4f} |
| Bayes | {r['bayes_auc'] or float('nan'):.4f} |

Share of the gap LR -> ceiling closed: **{r['gap_share']:.1%}**

Crosses proposed: {', '.join(' x '.join(c) for c in pc_['proposed']) or 'none'}; planted:
{', '.join(' x '.join(c) for c in r['planted_crosses'])} ({len(r['planted_found'])} of {len(r['planted_crosses'])} proposed).
Scored {pc_['candidates']} candidate pairs on {pc_['sample_rows']:,} sampled train rows{_took(pc_)}; the best ten:

| pair | z | df | cells | proposed |
|---|---:|---:|---:|---|
{ranked}

{_fm_pairs(r)}

## The config

```yaml
{r['config']}```
"""


def _took(entry: dict) -> str:
    """`, in S s` for a proposal whose manifest entry records its time."""
    return f", in {entry['seconds']:g} s" if "seconds" in entry else ""


def _fm_pairs(r: dict) -> str:
    """The fm pairs proposed beside the planted latent pair, and the best ten scored."""
    fm = r.get("proposed_fm_pairs")
    if not fm:
        return "No fm pair was scored (fewer than two columns with enough ids and rows per id)."
    latent = r.get("planted_latent") or []
    rows = "\n".join(f"| {' x '.join(s['columns'])} | {s['z']:.1f} | {s['gain']:.5f} | {'yes' if s.get('proposed') else ''} |"
                     for s in fm["ranked"][:10])
    return f"""fm pairs proposed: {', '.join(' x '.join(c) for c in fm['proposed']) or 'none'}; planted latent pair:
{' x '.join(latent) or 'none'}. Scored {fm['candidates']} pairs of embeddable columns ({fm['sample_rows'] - fm['held_out_rows']:,} rows
fitted, {fm['held_out_rows']:,} held out){_took(fm)}; the best ten:

| pair | z | held-out gain (nats a row) | proposed |
|---|---:|---:|---|
{rows}"""


if __name__ == "__main__":
    sys.exit(main())
