"""deepctr-torch 0.3.0 `WDL` on our exported features (run inside .venv-peers/deepctr-torch).

    python benchmarks/peers/deepctr_wdl.py FEATURES_DIR EPOCHS

Wide part (`linear_feature_columns`): every wide key of our config, crosses included, as
1-dim embeddings; deep part (`dnn_feature_columns`): our embedding keys with our dims, plus
the dense column. Same MLP widths, dropout, batch size; one Adagrad optimiser at our deep lr
(deepctr has one optimiser for both parts). Prints one `BENCH {json}` line per epoch.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import auc, emit, load, logloss  # noqa: E402


def main(folder: str, epochs: int) -> None:
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import WDL

    meta, data = load(folder)
    torch.manual_seed(meta["seed"])
    np.random.seed(meta["seed"])
    tr, te = meta["train"], meta["eval"]

    def column(key: str, dim: int, name: str):
        k = meta["keys"][key]
        sparse = SparseFeat(name, k["num_embeddings"], embedding_dim=dim, embedding_name=name)
        if k["multi"]:
            width = data[f"{tr}/{key}"].shape[1]
            return VarLenSparseFeat(sparse, maxlen=width, combiner="sum")
        return sparse

    # The same key may feed both parts with different tables (dim 1 wide, dim d deep): distinct names.
    linear = [column(k, 1, f"w_{k}") for k in meta["wide"]]
    dnn = [column(k, d, f"d_{k}") for k, d in meta["deep_embeddings"].items()]
    dense = [DenseFeat(n, 1) for n in meta["dense"]]

    def inputs(split: str) -> dict:
        x = {f"w_{k}": data[f"{split}/{k}"] for k in meta["wide"]}
        x.update({f"d_{k}": data[f"{split}/{k}"] for k in meta["deep_embeddings"]})
        for i, n in enumerate(meta["dense"]):
            x[n] = data[f"{split}/dense"][:, i]
        return x

    x_train, y_train = inputs(tr), data[f"{tr}/label"]
    x_test, y_test = inputs(te), data[f"{te}/label"]
    model = WDL(linear, dnn + dense, dnn_hidden_units=tuple(meta["hidden"]), dnn_dropout=meta["dropout"],
                init_std=meta["init_std"], seed=meta["seed"], task="binary", device="cpu")
    model.compile(torch.optim.Adagrad(model.parameters(), lr=meta["lr"]), "binary_crossentropy", metrics=[])
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.fit(x_train, y_train, batch_size=meta["batch_size"], epochs=1, verbose=0, shuffle=True)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        p = model.predict(x_test, batch_size=meta["eval_batch_size"]).reshape(-1)
        emit({"epoch": epoch, "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start,
              "auc": auc(p, y_test), "logloss": logloss(p, y_test),
              "samples_per_second": len(y_train) / train_seconds, "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
