#!/bin/bash
# One prepared command for a machine with one GPU: about 6-8 minutes on one H100, results under
# benchmarks/out/gpu-*. Needs torch (>= 2.11, CUDA build), pyarrow, scikit-learn, pyyaml, tqdm
# (matplotlib for the plots, optional); no torchrec: the pure-PyTorch embedding backend.
#
#   gpu-ml1m-sized-*   the planted MovieLens-shaped set at MovieLens-1M's size (800k training rows),
#                      held in GPU memory, batch 8192 and 1024: s/epoch (= s per 800k rows), samples/s
#                      (targets: <= 0.25 s at 8192; >= 400k samples/s at 1024)
#   gpu-ml1m-graphed-*  batch 8192 and 1024 with train.cuda_graph=true (the whole step as one CUDA graph)
#   gpu-ml1m-compiled-*  batch 1024 with train.compile=reduce-overhead (torch.compile + CUDA graphs)
#   gpu-step-variants-*.json  ms and kernels per step at batch 1024: eager, whole step graphed,
#                      compiled head, compiled head with CUDA graphs
#   gpu-throughput-*   Criteo-shaped (39 features), the five large columns at 131k and 4M rows,
#                      streamed from Parquet, batch 65536: samples/s beside the compute and hardware
#                      floors; kernels, memcpys and host syncs per step (target: >= 4M samples/s at 4M)
#
#     bash benchmarks/run_gpu.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -c "import sys, torch; sys.exit(0) if torch.cuda.is_available() else sys.exit(
    f'run_gpu.sh: no CUDA device visible to torch {torch.__version__}: this script is for a GPU machine')"
GPU="run.device=cuda model.embedding_backend=torch"
STAMP=$(date +%Y%m%d-%H%M%S)
ML1M=data/synthetic-movielens-1m      # 1M rows split 80/20 like MovieLens-1M: 800k training rows
CRITEO=data/bench/criteo-synth-4m     # 4M rows, 3.6M for training: no epoch boundary in the timed steps
[ -f "$ML1M/manifest.json" ] || $PY -m wdl.cli data generate --profile movielens --rows 1000000 --out "$ML1M" \
    --seed 0 --test-fraction 0.2 --workers 16 --no-progress
[ -f "$CRITEO/manifest.json" ] || $PY -m wdl.cli data generate --profile criteo --rows 4000000 --out "$CRITEO" \
    --workers 16 --no-progress

$PY -m benchmarks run ml1m-sized --out "benchmarks/out/gpu-ml1m-sized-$STAMP" $GPU

# Both batch sizes again with the whole step replayed as one CUDA graph (train.cuda_graph=true).
# Apart, so that a failure here loses none of the runs above.
$PY -m benchmarks run ml1m-sized --out "benchmarks/out/gpu-ml1m-graphed-$STAMP" $GPU \
    "systems.0.overrides=[data.in_memory=true, train.cuda_graph=true]" \
    "systems.1.overrides=[data.in_memory=true, train.cuda_graph=true]" \
    || echo "run_gpu.sh: the graphed run failed; its log is under benchmarks/out/gpu-ml1m-graphed-$STAMP"

# Batch 1024 again with the deep part's dense computation compiled and replayed as CUDA graphs
# (train.compile=reduce-overhead): fewer kernel launches per step. Apart, so that a failure here
# loses none of the runs above.
$PY -m benchmarks run ml1m-sized --out "benchmarks/out/gpu-ml1m-compiled-$STAMP" $GPU systems.0.enabled=false \
    "systems.1.overrides=[data.in_memory=true, train.compile=reduce-overhead]" \
    || echo "run_gpu.sh: the compiled run failed; its log is under benchmarks/out/gpu-ml1m-compiled-$STAMP"

# Step time and kernels per step at batch 1024, eager vs compiled, side by side with the MLP floor.
V="run.device=cuda model.embedding_backend=torch data.path=$ML1M data.in_memory=true data.batch_size=1024"
$PY -m benchmarks.scripts.step_variants --config configs/synthetic-movielens.yaml --out "benchmarks/out/gpu-step-variants-$STAMP.json" \
    --variant "eager=$V" --variant "graphed=$V train.cuda_graph=true" --variant "compiled=$V train.compile=default" \
    --variant "cudagraphs=$V train.compile=reduce-overhead" \
    || echo "run_gpu.sh: step_variants failed"

# The table-size system only, torch backend, 30 timed steps of 65536 rows (about 2M rows).
$PY -m benchmarks run throughput --out "benchmarks/out/gpu-throughput-$STAMP" $GPU data.path="$CRITEO" \
    systems.0.enabled=false systems.1.backends=[torch] systems.1.table_rows=[131072,4194304] \
    systems.1.batch_sizes=[65536] systems.1.steps=30 systems.1.timed_rows=0
echo "run_gpu.sh: results in benchmarks/out/gpu-{ml1m-sized,ml1m-graphed,ml1m-compiled,step-variants,throughput}-$STAMP*"
