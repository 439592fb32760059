"""`wdl tune`: the space file, successive halving's promotions, selection that never reads the
test split, and a written best.yaml that loads and trains (tiny data set, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_tiny_dataset, one_line_error, records, write_tiny_config
from wdl.cli import build_parser, main
from wdl.config import load_config
from wdl.data.manifest import load_manifest
from wdl.errors import ConfigError, TrainingError
from wdl.tune import Trial, draw_points, final_run, load_space, prepare, rung_budgets, search, successive_halving

SPACE = """\
optim.deep.lr: {log_uniform: [0.003, 0.03]}
model.deep.dropout: [0.0, 0.2]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ the space file
@pytest.mark.parametrize("text, needle", [
    ("optim.deep.lr: 0.1\n", "neither a list of values nor one of"),
    ("optim.deep.lr: {beta: [0.1, 1]}\n", "neither a list of values nor one of"),
    ("optim.deep.lr: {log_uniform: [0.0, 1]}\n", "log_uniform takes bounds > 0"),
    ("optim.deep.lr: {uniform: [1, 0.5]}\n", "lo <= hi"),
    ("optim.deep.lr: {uniform: [a, b]}\n", "two numbers"),
    ("model.deep.hidden: []\n", "an empty list"),
    ("model.deep.dropout: {int: [0.1, 2]}\n", "int takes two integers"),
    ("optim.deep.nope: [1, 2]\n", "not a config key"),
    ("model.deep.dropout.x: [1, 2]\n", "not a config key"),
    ("train.epochs: [1, 2]\n", "set by the search itself"),
    ("data: [{}]\n", "set by the search itself"),
    ("run.seed: [1, 2]\n", "set by the search itself"),
    ("[1, 2]\n", "expected a mapping"),
    ("a: [1\n", "invalid YAML"),
])
def test_space_file_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_space(write(tmp_path / "space.yaml", text))


def test_space_kinds_and_seeded_points(tmp_path):
    space = load_space(write(tmp_path / "s.yaml", "optim.deep.lr: {log_uniform: [0.001, 0.1]}\n"
                             "optim.wide.beta: {uniform: [0.5, 1.5]}\nmodel.deep.hidden: [[8], [16, 8]]\n"
                             "features.crosses.gender_movie.hash_buckets: {int: [10, 20]}\n"))
    assert [s.kind for s in space.values()] == ["log_uniform", "uniform", "choice", "int"]
    points, refused = draw_points(space, 20, 5, lambda p: None)
    assert len(points) == 20 and not refused and points == draw_points(space, 20, 5, lambda p: None)[0]
    for p in points:
        values = dict(o.split("=", 1) for o in p)
        assert 0.001 <= float(values["optim.deep.lr"]) <= 0.1 and 0.5 <= float(values["optim.wide.beta"]) <= 1.5
        assert values["model.deep.hidden"] in ("[8]", "[16, 8]")
        assert 10 <= int(values["features.crosses.gender_movie.hash_buckets"]) <= 20
    assert points != draw_points(space, 20, 6, lambda p: None)[0]  # another seed, other points


def test_refused_points_are_reported_and_replaced(tiny_config, capsys):
    space = {**load_space(write(tiny_config.parent / "s.yaml", "optim.deep.l1: [0.0, 0.1]\nmodel.deep.dropout: [0.0, 0.1, 0.2]\n"))}
    points, refused = draw_points(space, 3, 0, lambda p: load_config(tiny_config, p))
    assert len(points) == 3 and all("optim.deep.l1=0.0" in p for p in points)  # adam takes no l1
    assert refused and all("optim.deep.l1=0.1" in p and "FTRL's" in why for p, why in refused)
    # only 3 distinct points the config accepts: asking for more gives those
    assert len(draw_points(space, 10, 0, lambda p: load_config(tiny_config, p))[0]) == 3
    s, points, _ = prepare(args_for(tiny_config, tiny_config.parent / "s.yaml", tiny_config.parent / "t", "--trials", "5"))
    assert len(points) == 3 and "holds 3 distinct points the config accepts" in capsys.readouterr().out


# ------------------------------------------------------------------------ successive halving
def test_rung_budgets():
    assert rung_budgets(1, 20, 3) == [1, 3, 9, 20]
    assert rung_budgets(2, 10, 3) == [2, 6, 10]
    assert rung_budgets(1, 9, 3) == [1, 3, 9]
    assert rung_budgets(4, 4, 3) == [4]


def test_successive_halving_promotes_the_best_third():
    # valid AUC of each trial after each rung (a trial's best so far, so never lower)
    scores = {"a": [0.60, 0.61], "b": [0.70, 0.71], "c": [0.65, 0.80], "d": [0.50, 0.99], "e": [0.68, 0.69],
              "f": [0.55], "g": [0.66, 0.79], "h": [None], "i": [0.52]}
    trained, kept = [], []

    def train(t: Trial, rung: int, epochs: int) -> None:
        trained.append((t.id, rung, epochs))
        t.valid_auc, t.rung, t.epochs = scores[t.id][rung], rung, epochs

    trials = [Trial(k, [f"x={k}"]) for k in scores]
    winner = successive_halving(trials, [1, 3, 9, 20], 3, train, lambda rung, ts: kept.append([t.id for t in ts]))
    # rung 0: all nine at 1 epoch; the best 9 // 3 = 3 (b, e, g; h failed) go on to 3 epochs, where
    # one is left: c was better later (0.80) but did not make the cut at rung 0, as halving intends
    assert trained[:9] == [(k, 0, 1) for k in scores]
    assert kept == [["b", "e", "g"]]
    assert trained[9:] == [("b", 1, 3), ("e", 1, 3), ("g", 1, 3)]
    assert winner.id == "g" and winner.valid_auc == 0.79


def test_successive_halving_last_rung_ties_and_failures():
    def train(t: Trial, rung: int, epochs: int) -> None:
        t.valid_auc = {"p": 0.7, "q": 0.7, "r": None, "s": 0.6}[t.id]

    # eta 2 over one rung: the last rung decides; a tie goes to the earlier trial
    assert successive_halving([Trial(k, []) for k in "pqrs"], [2], 2, train).id == "p"
    with pytest.raises(TrainingError, match="every trial of rung 0 failed"):
        successive_halving([Trial("r", [])], [1, 3], 3, train)


# --------------------------------------------------------------------------------- the search
def args_for(config: Path, space: Path, out: Path, *extra: str):
    return build_parser().parse_args(["tune", "--config", str(config), "--space", str(space), "--out", str(out), *extra])


def test_selection_never_reads_test_and_best_yaml_trains(tmp_path, capsys):
    # A data set of its own whose test shards are garbage during the search: a read would fail.
    data = make_tiny_dataset(tmp_path / "data", rows=2000)
    config = write_tiny_config(tmp_path, data)  # no validation split: the search holds out 10% of train
    test_files = [f.path for f in load_manifest(data).split("test").files]
    kept = {p: p.read_bytes() for p in test_files}
    for p in test_files:
        p.write_bytes(b"not parquet" * 100)

    s, points, refused = prepare(args_for(config, write(tmp_path / "space.yaml", SPACE), tmp_path / "tune",
                                          "--trials", "4", "--eta", "2", "--max-epochs", "4", "train.epochs=3"))
    assert s.budgets == [1, 2, 4] and len(points) == 4 and not refused
    assert "data.valid_fraction=0.1" in s.base and "selecting on data.valid_fraction=0.1" in capsys.readouterr().out
    winner, trials = search(s, points, refused)
    out = capsys.readouterr().out

    # 4 trials at 1 epoch, the best 2 continued to 2 epochs (resumed, not retrained), then one is left
    assert all(t.valid_auc is not None and not t.error for t in trials), out
    promoted = sorted((t for t in trials if t.rung == 1), key=lambda t: -t.valid_auc)
    assert len(promoted) == 2 and winner is promoted[0]
    for t in trials:
        run = s.out / "trials" / t.id
        assert load_config(run / "config.yaml").data.eval_split == "train"  # never the test split
        assert [r["epoch"] for r in records(run)] == list(range(1, t.epochs + 1))
        assert (run / "config-2.yaml").exists() == (t.rung == 1)
        assert json.loads((run / "summary.json").read_text())["test"] is None  # a trial scores nothing at the end
    lines = [ln for ln in out.splitlines() if ln.startswith("t0")]
    assert len(lines) == 6 and all("valid AUC" in ln and "optim.deep.lr=" in ln for ln in lines)
    jsonl = [json.loads(ln) for ln in (s.out / "trials.jsonl").read_text().splitlines()]
    rung0 = sorted((r for r in jsonl if r["rung"] == 0), key=lambda r: -r["valid_auc"])
    assert [r["id"] for r in jsonl] == [t.id for t in trials] + [r["id"] for r in rung0[:2]]  # the best half goes on

    # best.yaml: the config with the winner's overrides and the held-out share; it loads as that
    best = s.out / "best.yaml"
    assert best.read_text().startswith(f"# Launch: wdl train --config {best}\n")
    assert load_config(best).to_dict() == load_config(config, s.base + winner.overrides).to_dict()
    assert load_config(best).data.eval_split == "test" and load_config(best).train.epochs == 3

    # ... and trains: the final run (from scratch, 3 epochs) scores the test split once
    for p, b in kept.items():
        p.write_bytes(b)
    summary = final_run(s, winner, trials, refused)
    assert summary["test_split"] == "test" and 0.5 < summary["test"]["auc"] < 1
    assert [r["epoch"] for r in records(s.out / "final")] == [1, 2, 3]
    report = (s.out / "report.md").read_text()
    assert f"| {winner.id} **winner** |" in report and "(scored once)" in report
    assert "test AUC of that model" in capsys.readouterr().out


def test_cli_runs_a_search(tmp_path, tiny_config, capsys):
    space = write(tmp_path / "space.yaml", SPACE)
    assert main(["tune", "--config", str(tiny_config), "--space", str(space), "--trials", "2", "--max-epochs", "1",
                 "train.epochs=1", "data.valid_fraction=0.2"]) == 0
    out = capsys.readouterr().out
    folder = tiny_config.parent / "runs" / "tiny-tune"  # the default: <run.out_dir>/<run.name>-tune
    assert "selecting on data.valid_fraction" not in out
    assert len([ln for ln in out.splitlines() if ln.startswith("t0")]) == 2
    assert (folder / "best.yaml").exists() and (folder / "final" / "summary.json").exists()
    assert f"report in {folder / 'report.md'}" in out


@pytest.mark.parametrize("args, needle", [
    (["--trials", "0"], "--trials 0: must be at least 1"),
    (["--eta", "1"], "--eta 1: must be at least 2"),
    (["--min-epochs", "3", "--max-epochs", "2"], "--max-epochs 2: must be at least --min-epochs 3"),
    (["model.nope=1"], "unknown config key 'model.nope'"),
])
def test_bad_arguments_are_one_line(tmp_path, tiny_config, capsys, args, needle):
    space = write(tmp_path / "space.yaml", SPACE)
    assert main(["tune", "--config", str(tiny_config), "--space", str(space), *args]) == 2
    one_line_error(capsys.readouterr().err, needle)


def test_bad_files_are_one_line(tmp_path, tiny_config, capsys):
    space = write(tmp_path / "space.yaml", SPACE)
    for args, needle in ((["--config", str(tmp_path / "nope.yaml"), "--space", str(space)], "config file not found"),
                         (["--config", str(tiny_config), "--space", str(tmp_path / "nope.yaml")], "space file not found"),
                         (["--config", str(tiny_config), "--space", str(write(tmp_path / "bad.yaml", "x: 1\n"))],
                          "not a config key"),
                         (["--config", str(tiny_config), "--space", str(space), "--out", str(tiny_config.parent)],
                          "not an empty folder")):
        assert main(["tune", *args]) == 2
        one_line_error(capsys.readouterr().err, needle)
