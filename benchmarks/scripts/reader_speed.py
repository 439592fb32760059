"""The streaming reader alone: rows/s of the StreamingLoader (Parquet -> Batches) over a data
set's train split, with no training.

    python -m benchmarks.scripts.reader_speed --config configs/synthetic-criteo-full.yaml \\
        --data data/bench/synthetic-criteo-1m [--batch-size 65536] [--shuffle-buffer 65536] \\
        [--workers 0] [--epochs 3] [--out F.json]

One epoch is read first and not counted (it warms the page cache); then each of `--epochs` epochs
is timed, loader processes' start included, and the median reported with the load average
around it. To compare two versions of the code, run this file from one tree with PYTHONPATH set
to each version's tree in turns, under the same load: the script only imports wdl's loader.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.reader_speed", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the config whose features are read")
    p.add_argument("--data", required=True, help="the data set folder (its train split is read)")
    p.add_argument("--batch-size", type=int, default=65536)
    p.add_argument("--shuffle-buffer", type=int, default=65536, help="rows shuffled together (data.shuffle_buffer)")
    p.add_argument("--workers", type=int, default=0, help="loader processes (0: read in this process)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs, after one that is not")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (a loader worker has 1)")
    p.add_argument("--out", type=Path, help="write the result here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from wdl.config import load_config
    from wdl.data.dataset import feature_spec, open_dataset
    from wdl.data.parquet import StreamingLoader
    from wdl.errors import WdlError

    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, [f"data.path={args.data}"])
        manifest = open_dataset(cfg.data)
        spec = feature_spec(cfg, manifest)
        files = [f.path for f in manifest.split(cfg.data.train_split).files]
        loader = StreamingLoader(files, spec, args.batch_size, num_workers=args.workers, shuffle=True,
                                 shuffle_buffer=args.shuffle_buffer, seed=cfg.run.seed)
    except WdlError as e:
        print(f"reader_speed: {e}", file=sys.stderr)
        return 2
    load, rates = [os.getloadavg()[0]], []
    for epoch in range(max(args.epochs, 1) + 1):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        rows = sum(len(b) for b in loader)
        if epoch:
            rates.append(rows / (time.perf_counter() - start))
    load.append(os.getloadavg()[0])
    import wdl

    result = {"wdl": str(Path(wdl.__file__).parent), "config": args.config, "data": args.data, "rows": rows,
              "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer, "workers": args.workers,
              "rows_per_second": [round(r) for r in rates], "median_rows_per_second": round(statistics.median(rates)),
              "load_1min": [round(x, 2) for x in load]}
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
