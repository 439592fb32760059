"""How close to Bayes can the planted model's own class get from this much data?

    python -m benchmarks.scripts.planted_ceiling --data DIR [--l2 0.3,1,3,10] [--epochs 30] [--out RESULTS_DIR]

DIR is a data set written by `wdl data generate --profile movielens|criteo --valid-fraction F`:
its labels come from a known logistic model (wdl/ingest/planted.py) and its manifest records
the Bayes-optimal test AUC. This script trains the *correctly specified* model, the exact
functional form of the planted logit with every per-value effect, latent vector, cross weight
and dense coefficient learned from the train split, and, as the baseline, the same model
without its latent interaction term (the correctly specified logistic regression with the true
crosses). Each is trained once per L2 value with early stopping on valid AUC; the L2 with the
best valid AUC is selected for each, and only the two selected models score the test split.

The headline is the share of the gap closed, (full - LR) / (Bayes - LR) in test AUC: how much
of the distance from "logistic regression with the right crosses" to Bayes a learner that
knows the functional form exactly, and only has to estimate its parameters, covers at this
data size. Model classes that must also discover the form (Wide & Deep) should not be expected
to do better, so it is a practical ceiling for a target stated as a share of that gap.

Limits. Training is MAP (penalised maximum likelihood) with one L2 strength for all per-value
tables, chosen on valid, and Adam with early stopping; it is not the Bayesian posterior mean,
which would average over the uncertainty of the many rarely seen ids and can do somewhat better.
Nor is it tuned beyond the L2 grid (learning rate, latent init and batch size are fixed), so the
number is a ceiling in the practical sense, a floor on what the true class can reach.

The penalty (--penalty):
- prior (default): each table row v adds l2 * |theta_v|^2 / count_v per train row that touches
  it (count_v: its train rows), so an epoch's total is l2 * sum_v |theta_v|^2, once per value:
  MAP under a N(0, 1 / (2 l2)) prior on every entry, whatever the data size. The planted scales
  put the ideal l2 between about 1 and 12 (prior standard deviations 0.7 down to 0.2).
- touched: l2 * |theta_v|^2 per train row that touches it (common in matrix factorisation):
  frequent values are shrunk more; useful l2 values are around 0.001 to 0.01.

The bias and the dense coefficients are not penalised. Ids never seen in train keep a zero
effect (the prior mean), as do missing values, which contribute 0 to the planted logit.
--train-rows N trains on the first N train rows only: a learning curve on one data set, with the
same ids, valid and test rows (the generator scales the number of users and items with --rows,
so two generated sizes differ in more than the data per parameter). Seeded and deterministic;
one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from benchmarks.results import write_report

SPLITS = ("train", "valid", "test")
SETTINGS = ("l2", "penalty", "train_rows", "epochs", "patience", "lr", "batch", "dim", "seed")
DEFAULT_L2 = {"prior": "0.3,1,3,10", "touched": "0.0003,0.001,0.003,0.01"}


class Refused(Exception):
    """A data set this script cannot use: one line for the user, exit code 2."""


# ---------------------------------------------------------------------------------- features
@dataclass
class Effect:
    """A learned per-value table: idx [n, k] rows into it per split (0 = none: missing or never
    seen in train, a fixed zero effect); a row's effect is the sum over its k entries, times
    `scale` [n] where the planted model averages (genre crosses)."""

    size: int
    idx: dict
    count: torch.Tensor  # train occurrences per table row, for the prior penalty
    scale: dict | None = None


@dataclass
class Features:
    """One profile's inputs: effects, the latent pair's ids (two Effects, whether or not they also
    have a main effect), dense inputs [n, d]."""

    effects: dict
    latent: tuple[Effect, Effect]
    dense: dict
    labels: dict
    bayes_p: np.ndarray
    dense_names: list = field(default_factory=list)


def compact(keys: dict) -> tuple[dict, int, torch.Tensor]:
    """Map raw keys (0 = none) to 1..K over the values seen in train; others to 0.

    Only values seen in train can be learned; the rest keep the prior's zero effect, exactly as
    a full table would leave them, at a fraction of the memory for Criteo's millions of ids."""
    seen = np.unique(keys["train"])
    seen = seen[seen != 0]
    out = {}
    for split, k in keys.items():
        pos = np.searchsorted(seen, k)
        hit = (pos < len(seen)) & (seen[np.minimum(pos, len(seen) - 1)] == k) & (k != 0)
        out[split] = torch.from_numpy(np.where(hit, pos + 1, 0).astype(np.int64))
    count = np.bincount(out["train"].reshape(-1).numpy(), minlength=len(seen) + 1)
    count[0] = 0
    return out, len(seen) + 1, torch.from_numpy(count.astype(np.float32))


def effect(keys: dict, scale: dict | None = None) -> Effect:
    idx, size, count = compact(keys)
    idx = {s: (v if v.dim() == 2 else v[:, None]) for s, v in idx.items()}
    return Effect(size, idx, count, scale)


def read_splits(root: Path, manifest: dict, columns: list[str], train_rows: int | None) -> dict:
    """The three splits; train cut to its first `train_rows` rows (rows are i.i.d. in file order)."""
    t = {s: pa.concat_tables(pq.read_table(root / f["path"], columns=columns)
                             for f in manifest["splits"][s]["files"]) for s in SPLITS}
    if train_rows:
        t["train"] = t["train"].slice(0, train_rows)
    return t


def ints(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy().astype(np.int64)


def standardise(dense: dict) -> dict:
    """Dense inputs scaled by train mean and std: the same linear class, better conditioned."""
    mu, sd = dense["train"].mean(0), dense["train"].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return {s: torch.from_numpy(((x - mu) / sd).astype(np.float32)) for s, x in dense.items()}


def movielens_features(root: Path, manifest: dict, train_rows: int | None) -> Features:
    """z = b + bu[user] + bi[item] + <P[user], Q[item]> + occ[occupation]
           + mean over the item's genres of (gg[gender, g] + ag[age, g]) + w * release_year."""
    t = read_splits(root, manifest, ["user_id", "movie_id", "age_bucket", "gender", "occupation", "genres",
                                     "release_year", "label", "bayes_p"], train_rows)
    genres, scale = {}, {}
    for s, tab in t.items():
        # An item's genres (1 to 3, deduplicated by the generator) padded to [n, 3] with 0.
        g = tab.column("genres").combine_chunks()
        off, val = g.offsets.to_numpy().astype(np.int64), g.values.to_numpy().astype(np.int64)
        n, lengths = len(tab), np.diff(off)
        pad = np.zeros((n, 3), np.int64)
        slot = np.arange(len(val)) - np.repeat(off[:-1], lengths)
        pad[np.repeat(np.arange(n), lengths), slot] = val
        genres[s] = pad
        scale[s] = torch.from_numpy((1.0 / np.maximum(lengths, 1)).astype(np.float32))

    def cross(col: str) -> dict:
        return {s: np.where(genres[s] > 0, ints(tab, col)[:, None] * 64 + genres[s], 0) for s, tab in t.items()}

    effects = {
        "user": effect({s: ints(tab, "user_id") for s, tab in t.items()}),
        "item": effect({s: ints(tab, "movie_id") for s, tab in t.items()}),
        "occupation": effect({s: ints(tab, "occupation") for s, tab in t.items()}),
        "gender x genre": effect(cross("gender"), scale),
        "age x genre": effect(cross("age_bucket"), scale),
    }
    dense = standardise({s: tab.column("release_year").to_numpy().astype(np.float64)[:, None] for s, tab in t.items()})
    return Features(effects, (effects["user"], effects["item"]), dense, labels(t),
                    t["test"].column("bayes_p").to_numpy(), ["release_year"])


def criteo_features(root: Path, manifest: dict, train_rows: int | None) -> Features:
    """z = b + sum over 15 columns of E_c[C] + <P[C11], Q[C19]> + three pair tables
           (C6 x C9, C14 x C17, C22 x C23) + linear in the 13 log1p dense + a * sin(2 * log1p I7).

    The Parquet holds ids as rank + 1 (0 = missing) and dense as log1p of the count with a
    missing count as 0, exactly the inputs of the planted logit; a missing dense value is an
    ordinary 0 there (the linear term still applies), a missing id contributes nothing."""
    from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE
    from wdl.ingest.planted import CRITEO_CROSSES, CRITEO_LATENT, CRITEO_VALUE_EFFECTS

    t = read_splits(root, manifest, [*CATEGORICAL, *DENSE, "label", "bayes_p"], train_rows)
    vocab = {c: int(manifest["columns"][c]["vocab_size"]) for c in CATEGORICAL}
    effects = {}
    for j in sorted(CRITEO_VALUE_EFFECTS):
        c = CATEGORICAL[j]
        effects[c] = effect({s: ints(tab, c) for s, tab in t.items()})
    for a, b in CRITEO_CROSSES:
        ca, cb = CATEGORICAL[a], CATEGORICAL[b]
        # The pair's own weight, whenever both are present (no hashing: the pairs are few).
        keys = {s: np.where((ints(tab, ca) > 0) & (ints(tab, cb) > 0), ints(tab, ca) * vocab[cb] + ints(tab, cb), 0)
                for s, tab in t.items()}
        effects[f"{ca} x {cb}"] = effect(keys)
    # C11 and C19 have no main effect in the planted logit: ids for the latent term only.
    a, b = (effect({s: ints(tab, CATEGORICAL[j]) for s, tab in t.items()}) for j in CRITEO_LATENT)
    i7 = DENSE.index("I7")
    dense = {}
    for s, tab in t.items():
        x = np.stack([tab.column(c).to_numpy().astype(np.float64) for c in DENSE], 1)
        dense[s] = np.concatenate([x, np.sin(2.0 * x[:, i7:i7 + 1])], 1)
    return Features(effects, (a, b), standardise(dense), labels(t), t["test"].column("bayes_p").to_numpy(),
                    [*DENSE, "sin(2 I7)"])


def labels(t: dict) -> dict:
    return {s: torch.from_numpy(tab.column("label").to_numpy().astype(np.float32)) for s, tab in t.items()}


PROFILES = {"movielens": movielens_features, "criteo": criteo_features}


# ---------------------------------------------------------------------------------- the model
class Planted(nn.Module):
    """The planted logit's form with learned parameters; latent=False drops <P, Q> (the LR)."""

    def __init__(self, f: Features, latent: bool, dim: int):
        super().__init__()
        self.f, self.latent = f, latent
        # Effects start at zero (the prior mean); row 0 stays zero (padding: no gradient).
        self.tables = nn.ModuleDict({self.key(k): nn.Embedding(e.size, 1, padding_idx=0) for k, e in f.effects.items()})
        for t in self.tables.values():
            nn.init.zeros_(t.weight)
        if latent:
            # Small random vectors: at zero the dot product's gradient vanishes.
            self.P, self.Q = (nn.Embedding(e.size, dim, padding_idx=0) for e in f.latent)
            for e in (self.P, self.Q):
                nn.init.normal_(e.weight, std=0.1)
                with torch.no_grad():
                    e.weight[0].zero_()
        self.w = nn.Parameter(torch.zeros(f.dense["train"].shape[1]))
        self.b = nn.Parameter(torch.zeros(1))

    @staticmethod
    def key(name: str) -> str:
        return name.replace(" ", "_").replace(".", "_")  # ModuleDict keys cannot hold dots

    def forward(self, split: str, rows: torch.Tensor, l2: float = 0.0, penalty: str = "prior"):
        """(logits, mean penalty per row) of `rows` of `split`."""
        f = self.f
        z = self.b + f.dense[split][rows] @ self.w
        reg = torch.zeros(len(rows))
        for k, e in f.effects.items():
            idx = e.idx[split][rows]
            v = self.tables[self.key(k)](idx).squeeze(-1)  # [n, k]
            z = z + (v.sum(1) if e.scale is None else v.sum(1) * e.scale[split][rows])
            if l2:
                reg = reg + (self.weight(e, idx, penalty) * v ** 2).sum(1)
        if self.latent:
            ea, eb = f.latent
            ia, ib = ea.idx[split][rows, 0], eb.idx[split][rows, 0]
            p, q = self.P(ia), self.Q(ib)
            z = z + (p * q).sum(1)
            if l2:
                reg = reg + self.weight(ea, ia, penalty) * (p ** 2).sum(1)
                reg = reg + self.weight(eb, ib, penalty) * (q ** 2).sum(1)
        return z, l2 * reg.mean()

    @staticmethod
    def weight(e: Effect, idx: torch.Tensor, penalty: str) -> torch.Tensor:
        # prior: 1 / count, so a value's penalty totals l2 |theta|^2 per epoch whatever its frequency.
        return 1.0 / e.count[idx].clamp(min=1.0) if penalty == "prior" else torch.ones(idx.shape)


# ---------------------------------------------------------------------------------- training
def auc(model: Planted, f: Features, split: str) -> float:
    model.eval()
    with torch.no_grad():
        z = torch.cat([model(split, r)[0] for r in torch.arange(len(f.labels[split])).split(65536)])
    model.train()
    return float(roc_auc_score(f.labels[split].numpy(), z.numpy()))


def train(f: Features, latent: bool, l2: float, args, log) -> tuple[dict, dict]:
    """One trial: (its record, the best epoch's weights). Early stopping on valid AUC."""
    torch.manual_seed(args.seed)  # same init and batch order for every trial: they differ by l2 only
    model = Planted(f, latent, args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(f.labels["train"])
    name = "full" if latent else "lr"
    rec = {"model": name, "l2": l2, "valid_auc": [], "train_loss": [], "seconds": []}
    best_state, best, best_epoch = None, -1.0, 0
    for epoch in range(1, args.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        for rows in torch.randperm(n, generator=gen).split(args.batch):
            z, reg = model("train", rows, l2, args.penalty)
            loss = nn.functional.binary_cross_entropy_with_logits(z, f.labels["train"][rows])
            opt.zero_grad(set_to_none=True)
            (loss + reg).backward()
            opt.step()
            total += loss.item() * len(rows)
        v = auc(model, f, "valid")
        rec["valid_auc"].append(v)
        rec["train_loss"].append(total / n)
        rec["seconds"].append(time.perf_counter() - t0)
        if v > best:
            best, best_epoch, best_state = v, epoch, copy.deepcopy(model.state_dict())
        log(f"[{name} l2={l2:g}] epoch {epoch}: train loss {total / n:.4f}, valid AUC {v:.4f} "
            f"(best {best:.4f} at {best_epoch}), {rec['seconds'][-1]:.1f} s")
        if epoch - best_epoch >= args.patience:
            break
    rec.update(best_valid_auc=best, best_epoch=best_epoch)
    return rec, best_state


def test_auc(f: Features, latent: bool, state: dict, dim: int) -> float:
    model = Planted(f, latent, dim)
    model.load_state_dict(state)
    return auc(model, f, "test")


# ---------------------------------------------------------------------------------- the run
def load(data: Path) -> tuple[dict, str]:
    path = data / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Refused(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    profile = (manifest.get("planted") or {}).get("profile")
    if profile not in PROFILES:
        raise Refused(f"{data} is not a planted data set (its manifest has no planted.profile movielens or criteo); "
                      f"make one with `wdl data generate`")
    if not manifest.get("splits", {}).get("valid", {}).get("rows"):
        raise Refused(f"{data} has no valid split to select L2 on; generate it with --valid-fraction 0.1")
    return manifest, profile


def run(args, log) -> dict:
    torch.set_num_threads(1)  # the machine may be shared; timings are not the point
    data = Path(args.data).expanduser().absolute()
    manifest, profile = load(data)
    t0 = time.perf_counter()
    f = PROFILES[profile](data, manifest, args.train_rows)
    tables = ", ".join(f"{k} {e.size - 1:,}" for k, e in f.effects.items())
    log(f"{profile}: {', '.join(f'{s} {len(f.labels[s]):,}' for s in SPLITS)} rows; tables {tables}; latent ids "
        f"{' x '.join(f'{e.size - 1:,}' for e in f.latent)} (read in {time.perf_counter() - t0:.1f} s)")
    trials, selected = [], {}
    for latent in (True, False):
        best = None
        for l2 in args.l2:
            rec, state = train(f, latent, l2, args, log)
            trials.append(rec)
            if best is None or rec["best_valid_auc"] > best[0]["best_valid_auc"]:
                best = (rec, state)
        rec, state = best
        selected[rec["model"]] = {"l2": rec["l2"], "best_epoch": rec["best_epoch"], "valid_auc": rec["best_valid_auc"],
                                  "test_auc": test_auc(f, latent, state, args.dim)}
    bayes = float(roc_auc_score(f.labels["test"].numpy(), f.bayes_p))
    full, lr = selected["full"]["test_auc"], selected["lr"]["test_auc"]
    return {
        "data": str(data), "profile": profile, "rows": {s: len(f.labels[s]) for s in SPLITS},
        "tables": {k: e.size - 1 for k, e in f.effects.items()},
        "latent_ids": [e.size - 1 for e in f.latent], "dense_inputs": f.dense_names,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "trials": trials, "selected": selected,
        "bayes_auc": {"test_bayes_p": bayes, "manifest": manifest.get("bayes_optimal_auc")},
        "gap_share": (full - lr) / (bayes - lr) if bayes > lr else float("nan"),
        "seconds": time.perf_counter() - t0,
    }


def report(r: dict, command: str) -> str:
    s, b = r["selected"], r["bayes_auc"]
    lines = [f"# Planted ceiling: {r['profile']}", "",
             "The planted model's own functional form, every parameter learned from the train split (MAP with L2, "
             "Adam, early stopping on valid AUC), against the same form without its latent term (logistic regression "
             "with the true crosses). See the docstring of benchmarks/scripts/planted_ceiling.py for what this "
             "number means and its limits.", "",
             f"- command: `{command}`", f"- data: {r['data']} (rows: "
             + ", ".join(f"{k} {v:,}" for k, v in r["rows"].items()) + ")",
             "- settings: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()),
             "- learned tables (values seen in train): " + ", ".join(f"{k} {v:,}" for k, v in r["tables"].items()),
             f"- total time: {r['seconds'] / 60:.1f} min", "",
             "## Result", "", "| | test AUC |", "|---|---:|",
             f"| LR with the true crosses (l2 {s['lr']['l2']:g}) | {s['lr']['test_auc']:.4f} |",
             f"| full planted form (l2 {s['full']['l2']:g}) | {s['full']['test_auc']:.4f} |",
             f"| Bayes (bayes_p on test; manifest {b['manifest']:.4f}) | {b['test_bayes_p']:.4f} |", "",
             f"Share of the gap LR -> Bayes closed by the full form: **{r['gap_share']:.1%}**", "",
             "## Trials", "", "| model | l2 | best valid AUC | best epoch | epochs run | s/epoch |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in r["trials"]:
        lines.append(f"| {t['model']} | {t['l2']:g} | {t['best_valid_auc']:.4f} | {t['best_epoch']} | "
                     f"{len(t['valid_auc'])} | {np.mean(t['seconds']):.1f} |")
    return "\n".join(lines) + "\n"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scripts.planted_ceiling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a planted data set with a valid split")
    ap.add_argument("--penalty", choices=sorted(DEFAULT_L2), default="prior", help="L2 form (see above)")
    ap.add_argument("--l2", type=floats, default=None, help="comma-separated L2 strengths to select from "
                    f"(default: prior {DEFAULT_L2['prior']}; touched {DEFAULT_L2['touched']})")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="train on the first N train rows only: a learning curve with the same ids and test rows")
    ap.add_argument("--epochs", type=int, default=30, help="most epochs per trial")
    ap.add_argument("--patience", type=int, default=2, help="epochs without a better valid AUC before stopping")
    ap.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=8, help="latent dimension (the planted one is 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for results.json and report.md (default: print only)")
    args = ap.parse_args(argv)
    args.l2 = args.l2 or floats(DEFAULT_L2[args.penalty])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        r = run(args, log)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    r["torch"] = torch.__version__
    command = "python -m benchmarks.scripts.planted_ceiling " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(r, command)
    print(text)
    if args.out:
        write_report(args.out, r, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
