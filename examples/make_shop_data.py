"""A small click log to try `wdl data import` on (docs/dataset-format.md, configs/example-import.yaml):

    python examples/make_shop_data.py data/shop-raw [--rows 20000] [--files 4]

Columns: user_id (integers from 0), item (strings, 1% null), category (strings), tags (lists of
strings, 0-3 each), price (log-normal, 2% null), ts (Unix seconds, one row per minute from
1,700,000,000) and clicked (0/1, from a planted logistic model of user, item, category and price).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_shop_table(rows: int = 20_000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    users, items, categories, tags = 500, 200, 8, 30
    user = rng.integers(0, users, rows)
    item = np.minimum(rng.zipf(1.5, rows) - 1, items - 1)  # a few popular items
    category = item % categories
    n_tags = rng.integers(0, 4, rows)
    tag_lists = [[f"tag{t}" for t in rng.integers(0, tags, k)] for k in n_tags]
    price = rng.lognormal(3.0, 1.0, rows)
    taste = rng.normal(0, 1, (users, categories))
    logit = -0.8 + taste[user, category] + 0.5 * (item < 5) - 0.3 * np.log1p(price) / 3
    item_names = np.array([f"sku-{i:04d}" for i in item], dtype=object)
    item_names[rng.random(rows) < 0.01] = None
    return pa.table({
        "user_id": pa.array(user, pa.int64()),
        "item": pa.array(item_names, pa.string()),
        "category": pa.array([f"cat-{c}" for c in category]),
        "tags": pa.array(tag_lists, pa.list_(pa.string())),
        "price": pa.array(price, mask=rng.random(rows) < 0.02),
        "ts": pa.array(1_700_000_000 + 60 * np.arange(rows, dtype=np.int64)),
        "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)),
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for the Parquet files")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = make_shop_table(a.rows, a.seed)
    per_file = -(-a.rows // a.files)
    for f in range(a.files):
        pq.write_table(table.slice(f * per_file, per_file), out / f"clicks-{f:02d}.parquet", row_group_size=4096)
    print(f"wrote {a.rows:,} rows in {a.files} files to {out}")


if __name__ == "__main__":
    main()
