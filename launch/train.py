"""Training entry point.

    python launch/train.py --config configs/movielens-100k.yaml [key=value ...]        # one process (debug)
    torchrun --nproc_per_node 4 launch/train.py --config configs/movielens-100k.yaml   # distributed
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source tree without installing

from wdl.cli import add_train_arguments, parse_args, run_guarded, train_main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a Wide & Deep model.")
    add_train_arguments(parser)
    sys.exit(run_guarded(train_main, parse_args(parser)))
