#!/bin/bash
# Reference results for this machine kind: every suite, one after another, then the light files
# (results.json, results.csv, report.md, plots) copied to benchmarks/results/<machine-kind>/<suite>-<date>/.
#
#     bash benchmarks/run_reference.sh [key=value ...]      e.g. threads=1 on a shared machine
#     SUITES="movielens-100k throughput" bash benchmarks/run_reference.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SUITES=${SUITES:-"peers-movielens-100k movielens-100k throughput scaling planted"}
KIND=$($PY -c "from benchmarks.machine import describe; print(describe()['kind'])") || {
  echo "cannot run $PY with torch: activate the project's venv or set PYTHON"; exit 1; }
DATE=$(date +%Y-%m-%d)
for s in $SUITES; do
  out=benchmarks/out/reference-$s-$DATE
  rm -rf "$out"
  extra=()
  [ "$s" = peers-movielens-100k ] && extra=(--install-peers)
  echo "=== $s ($(date +%H:%M:%S))"
  if $PY -m benchmarks run "$s" --out "$out" "${extra[@]}" "$@" > "$out.log" 2>&1; then
    dst=benchmarks/results/$KIND/$s-$DATE
    rm -rf "$dst" && mkdir -p "$dst"
    cp "$out"/results.json "$out"/results.csv "$out"/report.md "$dst"/
    cp "$out"/*.png "$dst"/ 2>/dev/null
    echo "    -> $dst"
  else
    echo "    FAILED: see $out.log"; tail -5 "$out.log"
  fi
done
