"""`wdl plan`: placement and step estimates on paper, in process, with no data prepared."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchrec")

from helpers import RUN_FUSED, RUN_TORCHREC  # noqa: E402
from wdl.cli import main  # noqa: E402

ML_ROWS = ["user_id=944", "movie_id=1683", "age_bucket=8", "gender=3", "occupation=22", "zip_prefix=383",
           "genres=20", "release_decade=9"]
# Criteo Kaggle's cardinalities (as DLRM's preprocessing counts them), C1..C26.
KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10,
          5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
KAGGLE_ROWS = [f"C{i + 1}={n}" for i, n in enumerate(KAGGLE)]


def _plan(capsys, tmp_path, config: str, *args: str) -> tuple[int, str, str]:
    # A data path with no data set: sizes come from --table-rows, nothing is prepared.
    rc = main(["plan", f"data.path={tmp_path / 'none'}", "--config", config, *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("world_size", [1, 2, 8, 128])
def test_plan_movielens_prints_plan(capsys, tmp_path, world_size):
    rc, out, err = _plan(capsys, tmp_path, "configs/movielens-100k.yaml", "--world-size", str(world_size),
                         "--table-rows", *ML_ROWS)
    assert rc == 0, err
    for what in ("deep_user_id", "deep_movie_id", "wide (wdl, 13 tables)", "look-up forward compute",
                 "input communication", "output communication", "dense MLP compute", "estimated samples/s",
                 "torchrec/distributed/planner/constants.py"):
        assert what in out
    assert f"plan: {world_size} x cuda" in out


def test_plan_json_memory_adds_up(capsys, tmp_path):
    rc, out, err = _plan(capsys, tmp_path, "configs/criteo.yaml", "--world-size", "8", "--json",
                         "--table-rows", *KAGGLE_ROWS)
    assert rc == 0, err
    p = json.loads(out)
    assert p["world_size"] == 8 and len(p["memory_per_rank"]) == 8
    deep = {t["name"]: t for t in p["tables"] if t["owner"] == "torchrec"}
    assert sorted(deep) == sorted(f"deep_C{i}" for i in range(1, 27))
    # Every row placed exactly once: the ranks' tables + state add up to the tables' size plus
    # optimiser state (deep: fp32 weights + AdaGrad's sum; wide: fp32 weight + FTRL's z and n).
    wide_rows = sum(KAGGLE) + 1000 + 2000 + 1000 + 50000 + 1  # columns, crosses, bias row
    expected = sum(n * 16 * (4 + 4) for n in KAGGLE) + wide_rows * (4 + 8)
    assert sum(m["tables_bytes"] for m in p["memory_per_rank"]) == expected
    assert sum(t["bytes"] for t in p["tables"]) == expected
    for m in p["memory_per_rank"]:
        assert m["tables_bytes"] <= m["hbm_bytes"] <= 0.85 * 80 * 2**30
    s = p["step_ms"]
    parts = ("lookup_fwd", "lookup_bwd", "input_comms", "output_comms", "dense_compute", "dense_allreduce")
    assert s["total"] == pytest.approx(sum(s[k] for k in parts)) and all(s[k] > 0 for k in parts)
    assert p["samples_per_second"] == pytest.approx(8 * 4096 / (s["total"] / 1e3))
    assert 1 / 8 - 1e-9 <= p["busiest_share"] <= 1


def test_plan_fp16_halves_the_weights(capsys, tmp_path):
    rows = [f"C{i}=40000000" for i in range(1, 27)]
    sizes = {}
    for dtype in ("fp32", "fp16"):
        rc, out, err = _plan(capsys, tmp_path, "configs/criteo-1tb.yaml", "--world-size", "16", "--json",
                             "--dtype", dtype, "--table-rows", *rows)
        assert rc == 0, err
        sizes[dtype] = sum(t["bytes"] for t in json.loads(out)["tables"] if t["owner"] == "torchrec")
    # dim 128: 512 (fp32) or 256 (fp16) bytes of weights per row, plus 4 of row-wise AdaGrad state
    assert sizes["fp32"] == 26 * 40_000_000 * (512 + 4)
    assert sizes["fp16"] == 26 * 40_000_000 * (256 + 4)


def test_plan_refuses_tables_that_do_not_fit(capsys, tmp_path):
    rc, out, err = _plan(capsys, tmp_path, "configs/criteo.yaml", "--world-size", "2", "--hbm-gb", "0.5",
                         "--table-rows", *KAGGLE_ROWS)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "GiB missing" in err and "Traceback" not in err


def test_plan_names_a_feature_without_a_size(capsys, tmp_path):
    rc, out, err = _plan(capsys, tmp_path, "configs/criteo.yaml", "--world-size", "2", "--table-rows", *KAGGLE_ROWS[1:])
    assert rc == 2 and err.count("\n") == 1
    assert "features.columns.C1" in err and "--table-rows C1=ROWS" in err


def test_plan_cpu_honours_cpu_sharding(capsys, tmp_path):
    rc, out, err = _plan(capsys, tmp_path, "configs/movielens-100k.yaml", "--world-size", "4", "--device", "cpu",
                         "--json", "--table-rows", *ML_ROWS)
    assert rc == 0, err
    p = json.loads(out)
    assert {t["sharding"] for t in p["tables"] if t["owner"] == "torchrec"} <= {"table_wise", "column_wise",
                                                                                 "table_column_wise"}
    assert all(m["hbm_bytes"] == 0 and m["host_bytes"] > 0 for m in p["memory_per_rank"])
    rc, out, err = _plan(capsys, tmp_path, "configs/movielens-100k.yaml", "--world-size", "4", "--device", "cpu",
                         "distributed.sharding=row_wise", "--table-rows", *ML_ROWS)
    assert rc == 2 and "needs CUDA" in err


def test_plan_takes_given_bandwidths(capsys, tmp_path):
    rc, out, err = _plan(capsys, tmp_path, "configs/movielens-100k.yaml", "--world-size", "16", "--json",
                         "--hbm-bw", "3350", "--intra-bw", "450", "--inter-bw", "50", "--peak-tflops", "50",
                         "--table-rows", *ML_ROWS)
    assert rc == 0, err
    a = json.loads(out)["assumptions"]
    assert (a["hbm_bw_gbs"], a["intra_node_bw_gbs"], a["inter_node_bw_gbs"]) == pytest.approx((3350, 450, 50))
    assert a["all_to_all_bw_gbs"] == pytest.approx(50)  # 16 ranks span two 8-rank nodes


# --------------------------------------------------------------------------------------------
# A run's plan.txt is the plan `wdl plan` prints for the same ranks, memory and batch size.

# helpers.RUN_TORCHREC's user table is 256 wide: column_wise splits it over 2 ranks;
# helpers.RUN_FUSED is wdl's row blocks only, deep tables included.
SHORT = ["train.epochs=1", "train.max_steps=1"]


def _run_plan_txt(config, world_size: int, backend: list[str], name: str, two_rank_run) -> str:
    """plan.txt of a real run: in this process (1 rank), or the session's uninterrupted torchrun
    run with gloo (2 ranks; conftest.py's two_rank_run, the same config and back-end, which
    test_distributed.py trains and resumes against: its plan.txt is written at the start, before
    any step)."""
    if world_size == 1:
        assert main(["train", "--config", str(config), *backend, *SHORT, f"run.name={name}"]) == 0
        return (config.parent / "runs" / name / "plan.txt").read_text()
    assert world_size == 2
    run, _ = two_rank_run(backend)
    return (run / "plan.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("backend", [RUN_TORCHREC, RUN_FUSED], ids=["torchrec", "torch"])
def test_a_runs_plan_is_wdl_plans(capsys, tiny_config, world_size, backend, two_rank_run):
    """One planner for both: the same tables, sharding types, ranks, bytes, memory per rank and
    step estimate, given the run's own capacity (the host's memory it measured)."""
    from wdl.distributed.plan_report import render

    txt = _run_plan_txt(tiny_config, world_size, backend, f"plan{world_size}", two_rank_run)
    host_gib = txt.split("capacity per rank: ")[1].split(" host")[0].split(", ")[1]
    capsys.readouterr()
    rc = main(["plan", "--config", str(tiny_config), *backend, "--device", "cpu", "--world-size", str(world_size),
               "--local-world-size", str(world_size), "--ddr-gb", host_gib, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    planned = json.loads(out)
    assert render(planned) + "\n" == txt
    by_name = {t["name"].split(" ")[0]: t for t in planned["tables"]}
    if backend is RUN_TORCHREC:
        assert by_name["deep_user_id"]["sharding"] == "column_wise"
        assert by_name["deep_user_id"]["ranks"] == list(range(world_size))  # split over both ranks at 2
        assert by_name["deep_movie_id"]["sharding"] == "table_wise"
    else:
        assert set(by_name) == {"wide", "deep"} and by_name["deep"]["ranks"] == list(range(world_size))


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no work done.

@pytest.mark.parametrize("args, needle", [
    (["--hbm-gb", "0"], "--hbm-gb 0.0"), (["--hbm-gb", "-1"], "--hbm-gb -1.0"), (["--hbm-gb", "nan"], "--hbm-gb nan"),
    (["--hbm-gb", "1e300"], "--hbm-gb 1e+300"), (["--ddr-gb", "inf"], "--ddr-gb inf"),
    (["--device", "cpu", "--ddr-gb", "0"], "--ddr-gb 0.0"), (["--intra-bw", "-5"], "--intra-bw -5.0"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0"), (["--table-rows", "user_id=9223372036854775808", *ML_ROWS[1:]], "user_id="),
    (["--table-rows", "user_id=0", *ML_ROWS[1:]], "user_id=0"), (["--world-size", "100000000"], "--world-size 100000000"),
    (["--world-size", "0"], "--world-size 0"), (["--local-world-size", "-1"], "--local-world-size -1"),
    (["--batch-size", "0"], "--batch-size 0"),
])
def test_plan_bad_arguments_are_one_line(capsys, tmp_path, args, needle):
    import time

    start = time.perf_counter()
    base = ["--world-size", "2"] if "--world-size" not in args else []
    rows = [] if "--table-rows" in args else ["--table-rows", *ML_ROWS]
    rc, out, err = _plan(capsys, tmp_path, "configs/movielens-100k.yaml", *base, *args, *rows)
    assert rc == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "ranks" not in err or "at least 0" not in err
    assert time.perf_counter() - start < 5
