#!/bin/bash
# One prepared command for a machine with one GPU: the movielens-100k and throughput suites in
# single-GPU mode (the pure-PyTorch embedding backend, which needs no torchrec), results under
# benchmarks/out/gpu-*. Needs only torch (>= 2.11), pyarrow, scikit-learn, pyyaml, tqdm
# (matplotlib for the plots, optional).
#
#     bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
GPU="run.device=cuda model.embedding_backend=torch"
$PY -m benchmarks run movielens-100k --out benchmarks/out/gpu-movielens-100k $GPU data.in_memory=true
$PY -m benchmarks run throughput --out benchmarks/out/gpu-throughput $GPU
# Issue 3's target: one MovieLens-1M-sized epoch (800k training rows) <= 1 s on one H100. The
# planted MovieLens profile has ML-1M's shape; 1M rows split 80/20. Batch 8192 keeps the GPU
# busy; the split lives on the device (data.in_memory).
ML1M=data/synthetic-movielens-1m
[ -f "$ML1M/manifest.json" ] || $PY -m wdl.cli data generate --profile movielens --rows 1000000 --out "$ML1M" --seed 0
$PY launch/train.py --config configs/synthetic-movielens.yaml $GPU data.path="$ML1M" data.in_memory=true \
    data.batch_size=8192 train.epochs=5 train.progress=false run.out_dir=benchmarks/out/gpu-ml1m-sized
