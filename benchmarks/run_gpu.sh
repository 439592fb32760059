#!/bin/bash
# One prepared command for a machine with one GPU: about 6-8 minutes on one H100. Results go to
# DIR (default benchmarks/out) as soon as each part ends, most important first, so a run cut
# short still leaves what finished. Needs torch (>= 2.11, CUDA build), pyarrow, scikit-learn,
# pyyaml, tqdm (matplotlib for the plots, optional); no torchrec: the pure-PyTorch embedding backend.
#
#   DIR/step-variants.json  ms, kernels, graph launches and host syncs per step at batch 1024:
#                      eager, the whole step as one CUDA graph (train.cuda_graph), the compiled
#                      head replayed as CUDA graphs (train.compile=reduce-overhead); beside the
#                      bare MLP floors
#   DIR/ml1m-sized/    the planted MovieLens-shaped set at MovieLens-1M's size (800k training rows),
#                      held in GPU memory, batch 8192 and 1024: s/epoch (= s per 800k rows), samples/s
#                      (targets: <= 0.25 s at 8192; >= 400k samples/s at 1024)
#   DIR/ml1m-graphed/  the same with train.cuda_graph=true
#   DIR/throughput/    Criteo-shaped (39 features), the five large columns at 131k and 4M rows,
#                      streamed from Parquet by loader workers (all cores but 4), batch 65536:
#                      samples/s beside the compute and hardware floors; kernels, memcpys and
#                      host syncs per step (target: >= 4M samples/s at 4M); the reader alone, in
#                      one process and with those workers (rows/s: can it feed 4M samples/s?)
#   DIR/ml1m-compiled/ batch 1024 with train.compile=reduce-overhead (torch.compile + CUDA graphs)
#   DIR/run_gpu.log    everything this script printed
#
#     bash benchmarks/run_gpu.sh [DIR]            (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DIR=${1:-benchmarks/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DIR"
exec > >(tee -a "$DIR/run_gpu.log") 2>&1
$PY -c "import sys, torch; sys.exit(0) if torch.cuda.is_available() else sys.exit(
    f'run_gpu.sh: no CUDA device visible to torch {torch.__version__}: this script is for a GPU machine')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
GPU="run.device=cuda model.embedding_backend=torch"
ML1M=data/synthetic-movielens-1m      # 1M rows split 80/20 like MovieLens-1M: 800k training rows
CRITEO=data/bench/criteo-synth-4m     # 4M rows, 3.6M for training: no epoch boundary in the timed steps
part() { echo "run_gpu.sh: $1 at $(date +%T)"; }
failed() { echo "run_gpu.sh: $1 failed (exit $2); see $DIR/run_gpu.log"; }

part "generating $ML1M"
[ -f "$ML1M/manifest.json" ] || $PY -m wdl.cli data generate --profile movielens --rows 1000000 --out "$ML1M" \
    --seed 0 --test-fraction 0.2 --workers 16 --no-progress || exit 1

# Step time and kernels per step at batch 1024, side by side with the MLP floors.
part "step variants"
V="run.device=cuda model.embedding_backend=torch data.path=$ML1M data.in_memory=true data.batch_size=1024"
$PY -m benchmarks.scripts.step_variants --config configs/synthetic-movielens.yaml --out "$DIR/step-variants.json" \
    --variant "eager=$V" --variant "graphed=$V train.cuda_graph=true" \
    --variant "compiled-head=$V train.compile=reduce-overhead" || failed "step_variants" $?

part "ml1m-sized, eager"
$PY -m benchmarks run ml1m-sized --out "$DIR/ml1m-sized" $GPU || failed "ml1m-sized" $?

part "ml1m-sized, the whole step as one CUDA graph"
$PY -m benchmarks run ml1m-sized --out "$DIR/ml1m-graphed" $GPU \
    "systems.0.overrides=[data.in_memory=true, train.cuda_graph=true]" \
    "systems.1.overrides=[data.in_memory=true, train.cuda_graph=true]" || failed "ml1m-sized graphed" $?

# The table-size system only, torch backend, 30 timed steps of 65536 rows (about 2M rows). One
# reading process decodes about 1M rows/s: the batches come from loader workers on all but 4 cores.
WORKERS=$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))
part "generating $CRITEO"
[ -f "$CRITEO/manifest.json" ] || $PY -m wdl.cli data generate --profile criteo --rows 4000000 --out "$CRITEO" \
    --workers 16 --no-progress || failed "criteo generation" $?
part "throughput"
$PY -m benchmarks run throughput --out "$DIR/throughput" $GPU data.path="$CRITEO" \
    systems.0.enabled=false systems.1.backends=[torch] systems.1.table_rows=[131072,4194304] \
    systems.1.batch_sizes=[65536] systems.1.steps=30 systems.1.timed_rows=0 \
    "systems.1.overrides=[data.in_memory=false, data.num_workers=$WORKERS, data.batch_size=65536]" \
    systems.1.reader_rows=4000000 systems.1.reader_workers=$WORKERS || failed "throughput" $?

# Batch 1024 with the deep part's dense computation compiled and replayed as CUDA graphs.
part "ml1m-sized, compiled head"
$PY -m benchmarks run ml1m-sized --out "$DIR/ml1m-compiled" $GPU systems.0.enabled=false \
    "systems.1.overrides=[data.in_memory=true, train.compile=reduce-overhead]" || failed "ml1m-sized compiled" $?
part "done; results in $DIR"
