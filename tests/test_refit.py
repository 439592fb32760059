"""train.refit: the epochs chosen on the held-out rows, then a new model on every train row for
that many epochs, scored once on test, in RUN/refit; in one process and under torchrun."""

from __future__ import annotations

import json

import pytest
from helpers import ok, one_line_error, records, torchrun

from wdl.cli import main
from wdl.config import load_config
from wdl.errors import ConfigError

REFIT = ["data.valid_fraction=0.2", "train.epochs=3", "train.refit=true", "train.threads=1"]


def test_the_refit_trains_every_train_row_for_the_chosen_epochs_and_scores_test_once(tiny_config, capsys):
    assert main(["train", "--config", str(tiny_config), *REFIT]) == 0
    out = capsys.readouterr().out
    run = tiny_config.parent / "runs" / "tiny"
    parent, child = (json.loads((d / "summary.json").read_text()) for d in (run, run / "refit"))
    epochs = parent["best_epoch"]
    assert parent["refit"] == {"run": str(run / "refit"), "epochs": epochs, "test_split": "test", "test": child["test"]}
    assert child["epochs"] == epochs and child["test"]["epoch"] == epochs and 0.5 < child["test"]["auc"] <= 1
    held, every = records(run), records(run / "refit")
    assert every[0]["train_rows"] > held[0]["train_rows"]  # the held-out rows are trained on too
    assert all("auc" not in r for r in every)  # the test split is read only at the end
    assert f"in {run / 'refit'}" in out and f"test AUC {child['test']['auc']:.4f} after {epochs} epochs (scored once)" in out
    # the refit is the plain run of the same seed on every train row for those epochs
    assert main(["train", "--config", str(tiny_config), "data.valid_fraction=0", f"train.epochs={epochs}",
                 "run.name=plain", "train.threads=1"]) == 0
    assert records(tiny_config.parent / "runs" / "plain")[-1]["auc"] == pytest.approx(child["test"]["auc"], abs=1e-12)


def test_the_refit_runs_on_every_rank_under_torchrun(tiny_config):
    ok(torchrun(tiny_config, 2, *REFIT[:3], "distributed.sharding=auto"))
    run = tiny_config.parent / "runs" / "tiny"
    parent, child = (json.loads((d / "summary.json").read_text()) for d in (run, run / "refit"))
    assert child["world_size"] == 2 and parent["refit"]["epochs"] == child["epochs"] == parent["best_epoch"]
    assert 0.5 < parent["refit"]["test"]["auc"] <= 1


@pytest.mark.parametrize("overrides, needle", [
    (["train.refit=true"], "set data.valid_fraction"),
    (["train.refit=true", "data.valid_split=valid"], "set data.valid_fraction"),
    (["train.refit=true", "data.valid_fraction=0.1", "train.eval_every_steps=10"], "train.eval_every_steps=0"),
    (["train.refit=true", "data.valid_fraction=0.1", "optim.schedule.plateau_factor=0.5"], "plateau decays"),
    (["train.refit=true", "data.valid_fraction=0.1", "train.max_steps=5"], "train.max_steps"),
])
def test_a_refit_it_cannot_do_is_refused(tiny_config, overrides, needle, capsys):
    with pytest.raises(ConfigError, match="train.refit"):
        load_config(tiny_config, overrides)
    assert main(["train", "--config", str(tiny_config), *overrides]) == 2
    one_line_error(capsys.readouterr().err, "train.refit", needle)


def test_a_resumed_run_continues_its_refit_in_the_same_folder(tiny_config):
    """--resume auto (a torchrun restart) finds the finished run and continues its refit, not a new one."""
    assert main(["train", "--config", str(tiny_config), *REFIT]) == 0
    run = tiny_config.parent / "runs" / "tiny"
    first = json.loads((run / "summary.json").read_text())["refit"]
    assert main(["train", "--config", str(tiny_config), *REFIT, "--resume", "auto"]) == 0
    again = json.loads((run / "summary.json").read_text())["refit"]
    for r in (first, again):
        r["test"].pop("eval_seconds")
    assert again == first and not (run / "refit-1").exists()
