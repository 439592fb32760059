"""One-off measurements of a single command, outside the suites.

A suite (benchmarks/suites, `wdl bench run`) trains and compares systems: repetitions, warm-up
epochs, summaries, `compare`. The scripts here time one command that is not training and that
no other system is set beside: preparing Criteo (`prepare_criteo`), importing your own files
(`data_import`) and scoring an exported model (`serve_latency`). Each writes results.json (and
report.md) with the same machine description as the suites (benchmarks.machine.describe) and
the load average around the measurement; peak memory is measured over the command's whole
process tree (measure.py). Run them from the root of the source tree:

    python -m benchmarks.scripts.prepare_criteo --rows 10000000
    python -m benchmarks.scripts.data_import --rows 10000000 --workers 2
    python -m benchmarks.scripts.serve_latency [--run runs/NAME]
"""
