"""Benchmark harness: YAML suites in benchmarks/suites, results (JSON, CSV, Markdown, PNG) per run.

    wdl bench list
    wdl bench run SUITE [--out DIR] [key=value ...]
    wdl bench compare RESULT_A RESULT_B
"""
