"""Benchmark harness: YAML suites in benchmarks/suites, results (JSON, CSV, Markdown, PNG) per run.

    wdl bench list
    wdl bench run SUITE [--out DIR] [key=value ...]
    wdl bench compare RESULT_A RESULT_B

Not installed with the wdl package (it needs the source tree: launch/, configs/, suites/):
`wdl bench` loads it from the checkout wdl runs from; `python -m benchmarks` runs it from the root.
"""
