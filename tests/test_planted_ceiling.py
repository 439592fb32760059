"""benchmarks/scripts/planted_ceiling.py: both profiles end to end on tiny planted sets, and its refusals."""

from __future__ import annotations

import json

import pytest

from benchmarks.scripts.planted_ceiling import main
from wdl.ingest.synthetic import generate


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny planted set of each profile, with a valid split."""
    root = tmp_path_factory.mktemp("planted")
    for profile in ("movielens", "criteo"):
        generate(profile, 10000, root / profile, seed=3, valid_fraction=0.1, progress=False)
    return root


@pytest.mark.parametrize("profile", ["movielens", "criteo"])
def test_writes_results_for_both_profiles(planted, tmp_path, profile, capsys):
    out = tmp_path / "out"
    assert main(["--data", str(planted / profile), "--epochs", "2", "--l2", "1", "--train-rows", "7000",
                 "--out", str(out)]) == 0
    assert "epoch 1: train loss" in capsys.readouterr().out  # a progress line per epoch
    r = json.loads((out / "results.json").read_text())
    assert r["profile"] == profile and "Share of the gap" in (out / "report.md").read_text()
    assert r["rows"]["train"] == 7000 and r["rows"]["test"] > 500
    assert [t["model"] for t in r["trials"]] == ["full", "lr"]
    for t in r["trials"]:
        assert 1 <= len(t["valid_auc"]) <= 2 and 0.5 < t["best_valid_auc"] <= 1
    for s in r["selected"].values():
        assert s["l2"] == 1 and 0.5 < s["test_auc"] <= 1
    # Bayes from the test rows' bayes_p is the manifest's (a histogram of 2^20 bins there)
    assert r["bayes_auc"]["test_bayes_p"] == pytest.approx(r["bayes_auc"]["manifest"], abs=1e-3)
    assert r["gap_share"] == pytest.approx((r["selected"]["full"]["test_auc"] - r["selected"]["lr"]["test_auc"])
                                           / (r["bayes_auc"]["test_bayes_p"] - r["selected"]["lr"]["test_auc"]))


def test_deterministic(planted, capsys):
    args = ["--data", str(planted / "movielens"), "--epochs", "1", "--l2", "0.3,3", "--penalty", "touched"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert progress(capsys.readouterr().out) == progress(first)


def progress(text: str) -> list[str]:
    """The progress lines without their timings."""
    return [ln.rsplit(",", 1)[0] for ln in text.splitlines() if "epoch" in ln]


def test_refuses_a_set_that_is_not_planted_or_has_no_valid_split(tmp_path, tiny_data, capsys):
    assert main(["--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert "not a planted data set" in err and err.count("\n") == 1
    generate("movielens", 2000, tmp_path / "novalid", seed=3, progress=False)
    assert main(["--data", str(tmp_path / "novalid")]) == 2
    err = capsys.readouterr().err
    assert "no valid split" in err and err.count("\n") == 1
    assert main(["--data", str(tmp_path / "missing")]) == 2
