"""pytorch-widedeep 1.7.0 `WideDeep` on our exported features (run inside .venv-peers/pytorch-widedeep).

    python benchmarks/peers/widedeep_wdl.py FEATURES_DIR EPOCHS

Wide part (`Wide`): every wide key of our config, crosses included, one id range per key in a
single sum-pooled dim-1 table (multi-valued keys padded with 0, its padding id). Deep part
(`TabMlp`): our single-valued embedding keys with our dims; a multi-valued key (genres) has no
sum-pooled embedding in TabMlp, so it enters as indicator columns next to the dense column (a
linear layer on indicators is a sum-pooled embedding). Same MLP widths, dropout, batch size;
one Adagrad optimiser at our deep lr. The Trainer keeps its own defaults otherwise
(DataLoader workers = CPU count). Prints one `BENCH {json}` line per epoch.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import auc, emit, load, logloss  # noqa: E402


def main(folder: str, epochs: int) -> None:
    from pytorch_widedeep import Trainer
    from pytorch_widedeep.models import TabMlp, Wide, WideDeep

    meta, data = load(folder)
    torch.manual_seed(meta["seed"])
    np.random.seed(meta["seed"])
    tr, te = meta["train"], meta["eval"]
    keys = meta["keys"]

    def wide(split: str) -> np.ndarray:
        cols, offset = [], 0
        for k in meta["wide"]:
            a = data[f"{split}/{k}"]
            if keys[k]["multi"]:  # already shifted by one, 0 = padding
                cols.append(np.where(a > 0, a + offset, 0))
            else:
                cols.append((a + 1 + offset)[:, None])
            offset += keys[k]["num_embeddings"] + 1
        return np.concatenate(cols, axis=1), offset

    x_wide_tr, wide_dim = wide(tr)
    x_wide_te, _ = wide(te)

    single = [k for k in meta["deep_embeddings"] if not keys[k]["multi"]]
    multi = [k for k in meta["deep_embeddings"] if keys[k]["multi"]]

    def tab(split: str):
        cols, names = [], []
        for k in single:  # TabMlp's embeddings reserve 0 too: shift by one
            cols.append((data[f"{split}/{k}"] + 1)[:, None].astype(np.float64))
            names.append(k)
        for k in multi:
            a = data[f"{split}/{k}"]
            onehot = np.zeros((len(a), keys[k]["num_embeddings"]), dtype=np.float64)
            rows = np.repeat(np.arange(len(a)), a.shape[1])
            onehot[rows, a.reshape(-1)] = 1.0
            onehot = onehot[:, 1:]  # column 0 counted the padding
            cols.append(onehot)
            names += [f"{k}_{i}" for i in range(onehot.shape[1])]
        dense = data[f"{split}/dense"].astype(np.float64)
        cols.append(dense)
        names += meta["dense"]
        return np.concatenate(cols, axis=1), names

    x_tab_tr, names = tab(tr)
    x_tab_te, _ = tab(te)
    continuous = [n for n in names if n not in single]
    deep = TabMlp(
        column_idx={n: i for i, n in enumerate(names)},
        cat_embed_input=[(k, keys[k]["num_embeddings"] + 1, meta["deep_embeddings"][k]) for k in single],
        continuous_cols=continuous,
        mlp_hidden_dims=list(meta["hidden"]),
        mlp_dropout=meta["dropout"],
    )
    model = WideDeep(wide=Wide(input_dim=wide_dim, pred_dim=1), deeptabular=deep)
    trainer = Trainer(model, objective="binary", optimizers=torch.optim.Adagrad(model.parameters(), lr=meta["lr"]),
                      verbose=0, seed=meta["seed"], device="cpu")
    y_tr, y_te = data[f"{tr}/label"], data[f"{te}/label"]
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        trainer.fit(X_wide=x_wide_tr, X_tab=x_tab_tr, target=y_tr, n_epochs=1, batch_size=meta["batch_size"])
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        p = trainer.predict_proba(X_wide=x_wide_te, X_tab=x_tab_te, batch_size=meta["eval_batch_size"])[:, 1]
        emit({"epoch": epoch, "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
              "auc": auc(p, y_te), "logloss": logloss(p, y_te), "samples_per_second": len(y_tr) / train_seconds,
              "torch": torch.__version__, "num_workers": trainer.num_workers, "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
