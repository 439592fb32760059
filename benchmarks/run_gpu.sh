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
