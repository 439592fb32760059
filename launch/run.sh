#!/usr/bin/env bash
# Common launches of launch/train.py. Usage: launch/run.sh [MODE] [CONFIG] [key=value ...]
#
#   launch/run.sh cpu    configs/movielens-100k.yaml     # one process on CPU (debug mode)
#   launch/run.sh gpu    configs/movielens-100k.yaml     # one process on GPU 0
#   launch/run.sh gpus   configs/criteo.yaml             # one process per local GPU (NPROC to override)
#   launch/run.sh cpu2   configs/movielens-100k.yaml     # 2 CPU processes, gloo (NPROC to override)
#   NNODES=2 NODE_RANK=0 MASTER=host0:29500 launch/run.sh nodes configs/criteo.yaml   # on each node
#
# Restarts: MAX_RESTARTS=K adds --max-restarts K and --resume auto (set checkpoint.every_steps).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-cpu}"; CONFIG="${2:-configs/movielens-100k.yaml}"; shift $(( $# > 2 ? 2 : $# ))
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
RESTART=(); [ -n "${MAX_RESTARTS:-}" ] && RESTART=(--max-restarts "$MAX_RESTARTS")
RESUME=(); [ -n "${MAX_RESTARTS:-}" ] && RESUME=(--resume auto)
# run TORCHRUN_OPTION... -- OVERRIDE...
run() {
  local opts=(); while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
  "$PY" -m torch.distributed.run "${RESTART[@]}" "${opts[@]}" launch/train.py --config "$CONFIG" "${RESUME[@]}" "$@"
}
case "$MODE" in
  cpu)   exec "$PY" launch/train.py --config "$CONFIG" run.device=cpu "$@" ;;
  gpu)   exec "$PY" launch/train.py --config "$CONFIG" run.device=cuda:0 "$@" ;;
  cpu2)  run --standalone --nproc_per_node "${NPROC:-2}" -- run.device=cpu "$@" ;;
  gpus)  run --standalone --nproc_per_node "${NPROC:-$(nvidia-smi -L | wc -l)}" -- "$@" ;;
  nodes) run --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${NPROC:-gpu}" \
             --rdzv_backend c10d --rdzv_endpoint "${MASTER:?}" -- "$@" ;;
  *) echo "unknown mode $MODE (cpu, gpu, cpu2, gpus, nodes)" >&2; exit 2 ;;
esac
