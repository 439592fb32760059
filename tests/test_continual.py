"""Continual training: data sets that continue an earlier one's ids (`wdl data import --vocab-from`,
`wdl data generate --days`), warm starts that grow the tables (`wdl train --init-from`),
progressive validation (`train.eval_before_training`), and the `continual` benchmark in small."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import ROOT, RUN_FUSED, RUN_TORCHREC, one_line_error, read_split, records
from wdl.cli import main
from wdl.config import load_config
from wdl.data.manifest import load_manifest
from wdl.distributed.env import init_distributed
from wdl.errors import CheckpointError
from wdl.model.embeddings import torchrec_available
from wdl.train.trainer import Trainer


# ------------------------------------------------------------------ ids kept across imports
def day_table(users: range, items: range, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    u = rng.choice(np.array(list(users)), rows)
    i = rng.choice(np.array(list(items)), rows)
    return pa.table({"user": pa.array(u, pa.int64()),
                     "item": pa.array([f"sku-{k}" for k in i], pa.string()),
                     "tags": pa.array([[f"t{j}" for j in rng.integers(0, 4, 2)] for _ in range(rows)], pa.list_(pa.string())),
                     "price": pa.array(rng.lognormal(3, 1, rows)),
                     "clicked": pa.array((rng.random(rows) < 0.3).astype(np.int8))})


SPEC = """\
label: clicked
columns:
  user: {kind: categorical}
  item: {kind: categorical}
  tags: {kind: multi_hot}
  price: {kind: dense}
split: {kind: random, seed: 3, test_fraction: 0.2}
"""


def import_day(capsys, tmp_path: Path, name: str, table: pa.Table, *extra: str) -> tuple[int, str, str]:
    raw = tmp_path / f"{name}.parquet"
    pq.write_table(table, raw)
    (tmp_path / "spec.yaml").write_text(SPEC)
    rc = main(["data", "import", str(raw), "--spec", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / name),
               "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def vocab(data: Path, column: str) -> list:
    m = load_manifest(data)
    return json.loads(m.vocab_path(column).read_text())


def test_vocab_from_keeps_every_id_and_numbers_new_values_after(tmp_path, capsys):
    assert import_day(capsys, tmp_path, "day1", day_table(range(0, 40), range(0, 25), 1500, 0))[0] == 0
    rc, out, err = import_day(capsys, tmp_path, "day2", day_table(range(20, 60), range(10, 35), 1500, 1),
                              "--vocab-from", str(tmp_path / "day1"))
    assert rc == 0, err
    for col, new in (("user", set(range(40, 60))), ("item", {f"sku-{k}" for k in range(25, 35)})):
        old, grown = vocab(tmp_path / "day1", col), vocab(tmp_path / "day2", col)
        assert grown[:len(old)] == old  # every known value keeps its id, even those absent today
        assert set(grown[len(old):]) == new  # the new ones, after the old ones
    m1, m2 = load_manifest(tmp_path / "day1"), load_manifest(tmp_path / "day2")
    assert m2.raw["parent"] == {"path": str(m1.root), "identity": m1.identity} and m2.raw["lineage"] == [m1.identity]
    g = m2.raw["vocab_growth"]["user"]
    assert (g["vocab_size_before"], g["vocab_size"], g["new_values"]) == (41, 61, 20)
    train_users = read_split(tmp_path / "day2", "train").column("user").to_numpy()
    assert g["new_value_rows"] == int((train_users >= 41).sum()) > 0  # train rows holding a new user
    assert m2.raw["vocab_growth"]["tags"]["new_values"] == 0
    assert "user: 20 new values (41 -> 61 ids)" in out and f"seen {g['new_value_rows']:,} times" in out
    # a third day continues the second: the lineage holds both
    assert import_day(capsys, tmp_path, "day3", day_table(range(50, 70), range(0, 5), 500, 2),
                      "--vocab-from", str(tmp_path / "day2"))[0] == 0
    assert load_manifest(tmp_path / "day3").raw["lineage"] == [m1.identity, m2.identity]
    assert vocab(tmp_path / "day3", "user")[:61] == vocab(tmp_path / "day2", "user")


def test_vocab_from_refuses_a_column_of_other_values(tmp_path, capsys):
    assert import_day(capsys, tmp_path, "day1", day_table(range(0, 40), range(0, 25), 500, 0))[0] == 0
    t = day_table(range(0, 40), range(0, 25), 500, 1)
    t = t.set_column(0, "user", pa.array([f"u{v}" for v in t.column("user").to_pylist()]))
    rc, _, err = import_day(capsys, tmp_path, "day2", t, "--vocab-from", str(tmp_path / "day1"))
    assert rc == 2
    one_line_error(err, "column 'user' holds int64 values there, string here")


def test_a_capped_vocabulary_recycles_the_ids_it_lists_and_a_warm_start_resets_only_those(tmp_path, capsys):
    """user capped at 45 ids: day 2's 20 new users take the 4 free ids and the ids of the 16 users
    unseen longest (none of day 1's users 0-19 is seen on day 2; ties by id); a warm start on day 2
    starts exactly those rows afresh and keeps every other."""
    assert import_day(capsys, tmp_path, "day1", day_table(range(0, 40), range(0, 25), 1500, 0))[0] == 0
    (tmp_path / "capped.yaml").write_text(SPEC.replace("user: {kind: categorical}", "user: {kind: categorical, max_rows: 45}"))
    pq.write_table(day_table(range(20, 60), range(0, 25), 1500, 1), tmp_path / "raw2.parquet")
    assert main(["data", "import", str(tmp_path / "raw2.parquet"), "--spec", str(tmp_path / "capped.yaml"),
                 "--out", str(tmp_path / "day2"), "--no-progress", "--vocab-from", str(tmp_path / "day1")]) == 0
    out = capsys.readouterr().out
    v1, v2 = vocab(tmp_path / "day1", "user"), vocab(tmp_path / "day2", "user")
    expected = sorted(v1.index(u) for u in range(20))[:16]
    m2 = load_manifest(tmp_path / "day2")
    assert m2.raw["recycled"] == {"user": expected} and "16 ids recycled" in out
    assert len(v2) == 45 and len(set(v2[1:])) == 44 and set(v2[1:]) >= set(range(20, 60))
    assert all(v2[i] == v1[i] for i in range(41) if i not in expected)  # the other ids keep their values
    assert {v2[i] for i in expected} | set(v2[41:]) == set(range(40, 60))
    assert m2.raw["vocab_growth"]["user"]["without_row"] == 0

    from helpers import write_shop_config

    runs = tmp_path / "runs"
    config = write_shop_config(tmp_path / "shop.yaml", tmp_path / "day1", runs, "day1")
    assert main(["train", "--config", str(config)]) == 0
    then = _trainer(config, f"checkpoint.resume={runs / 'day1'}", "run.name=then")
    now = _trainer(config, f"data.path={tmp_path / 'day2'}", f"train.init_from={runs / 'day1'}", "run.name=now")
    fresh = _trainer(config, f"data.path={tmp_path / 'day2'}", "run.name=fresh")
    checked = 0
    for name, (w0, s0, tables0, _, _) in then["groups"].items():
        w1, s1, tables1, _, _ = now["groups"][name]
        wf, sf, _, _, _ = fresh["groups"][name]
        (_, o0, n0), (_, o1, n1) = next(t for t in tables0 if t[0] == "user"), next(t for t in tables1 if t[0] == "user")
        assert (n0, n1) == (41, 45)
        for a, b, c in [(w0, w1, wf), *((s0[k], s1[k], sf[k]) for k in s0)]:
            for i in range(n1):
                want = c[o1 + i] if i in expected or i >= n0 else a[o0 + i]
                assert torch.equal(b[o1 + i], want), (name, i)
                checked += 1
    assert checked >= 2 * 45

    # serving follows: the warm-started run, exported, scores a new user as trained and a value
    # without an id (never seen, or whose id was recycled) as the reserved id 0
    assert main(["train", "--config", str(config), f"data.path={tmp_path / 'day2'}", "run.name=day2",
                 "--init-from", str(runs / "day1")]) == 0
    assert main(["export", str(runs / "day2"), "--out", str(tmp_path / "served")]) == 0
    from wdl.serve import Scorer

    row = {"item": "sku-3", "tags": ["t1"], "price": 20.0}
    lost = v1[expected[0]]  # a day-1 user whose id went to another
    p = Scorer.load(tmp_path / "served").score([{**row, "user": u} for u in (55, 10_000, lost, 30)], raw=True)
    assert p[1] == p[2] and p[0] != p[1] and p[3] != p[1]


# ----------------------------------------------------------------------- warm starts
def grown_copy(src: Path, out: Path, more: dict[str, int]) -> Path:
    """`src` with `more` rows in some vocabularies (values no row holds yet), as its descendant."""
    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    for col, k in more.items():
        m["columns"][col]["vocab_size"] += k
    m["lineage"] = [load_manifest(src).identity]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


FULL_BATCH = ["data.batch_size=4096"]  # one step an epoch: its loss does not depend on the shuffle


def test_warm_start_without_new_data_continues_the_run(tiny_config):
    """Four epochs in one run, against two epochs then a warm start for two more: the same losses
    and scores (weights, FTRL's z and n, Adam's moments and step counts all carried)."""
    runs = tiny_config.parent / "runs"
    assert main(["train", "--config", str(tiny_config), *FULL_BATCH, "train.epochs=4", "checkpoint.keep=5",
                 "run.name=whole"]) == 0
    assert main(["train", "--config", str(tiny_config), *FULL_BATCH, "train.epochs=2", "run.name=warm",
                 "--init-from", str(runs / "whole" / "checkpoints" / "step-00000002")]) == 0
    whole, warm = records(runs / "whole"), records(runs / "warm")
    assert len(whole) == 4 and len(warm) == 2
    for a, b in zip(whole[2:], warm):
        for k in ("train_loss", "auc", "logloss"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), k


def _groups(t: Trainer) -> dict:
    """Per fused group: (weights, per-row optimiser state, its tables' offsets and rows)."""
    out = {}
    for opt in ("wide_tables", "deep_tables"):
        o = t.optimizer.optimizers[opt]
        for name, g in o.groups.items():
            rows = {k: v for k, v in o.state[name].items() if k in o.rule.per_row}
            out[name] = (g.rows.weight.detach().clone(), {k: v.clone() for k, v in rows.items()},
                         [(tb.feature, off, tb.num_embeddings) for tb, off in zip(g.tables, g.offsets)], g.bias_row,
                         {k: v.clone() for k, v in o.state[name].items() if k not in o.rule.per_row})
    return out


def _trainer(config: Path, *overrides: str) -> dict:
    """A built Trainer's tables and state (eval_only: one reading a model, that never trains)."""
    loads = any(o.startswith(("checkpoint.resume=", "train.init_from=")) for o in overrides)
    t = Trainer(load_config(config, ["train.eval_only=true"] * loads + list(overrides)), init_distributed("cpu"))
    try:
        dense = {k: v.detach().clone() for k, v in t.wide_deep.named_parameters() if v.requires_grad}
        return {"groups": _groups(t), "dense": dense,
                "dense_state": {k: {n: v.clone() for n, v in s.items()} for k, s in
                                t.optimizer.optimizers["deep"].state_dict().items()}}
    finally:
        t.close()


def test_grown_tables_keep_old_rows_and_state_and_new_rows_start_fresh(tiny_config, tiny_data, tmp_path):
    runs = tiny_config.parent / "runs"
    assert main(["train", "--config", str(tiny_config), "train.epochs=1", "run.name=day1"]) == 0
    grown = grown_copy(tiny_data, tmp_path / "grown", {"user_id": 10, "movie_id": 5, "genres": 2})
    ckpt = next((runs / "day1" / "checkpoints").glob("step-*"))
    then = _trainer(tiny_config, f"checkpoint.resume={ckpt}", "run.name=then")
    now = _trainer(tiny_config, f"data.path={grown}", f"train.init_from={runs / 'day1'}", "run.name=now")
    fresh = _trainer(tiny_config, f"data.path={grown}", "run.name=fresh")
    assert then["dense"].keys() == now["dense"].keys()
    for k in then["dense"]:  # dense layers and their optimiser state carried
        assert torch.equal(then["dense"][k], now["dense"][k]), k
        for n, v in then["dense_state"][k].items():
            assert torch.equal(v, now["dense_state"][k][n]), (k, n)
    grew = 0
    for name, (w0, s0, tables0, bias0, scalars0) in then["groups"].items():
        w1, s1, tables1, bias1, scalars1 = now["groups"][name]
        wf, sf, _, _, _ = fresh["groups"][name]
        for k, v in scalars0.items():  # lazy Adam's step count
            assert torch.equal(v, scalars1[k]), (name, k)
        for (f, o0, n0), (f1, o1, n1) in zip(tables0, tables1):
            assert f == f1 and n1 >= n0
            grew += n1 > n0
            for a, b, c in [(w0, w1, wf), *((s0[k], s1[k], sf[k]) for k in s0)]:
                assert torch.equal(b[o1:o1 + n0], a[o0:o0 + n0]), (name, f)  # old rows exactly
                assert torch.equal(b[o1 + n0:o1 + n1], c[o1 + n0:o1 + n1]), (name, f)  # new rows: a fresh run's
        if bias0 is not None:
            assert torch.equal(w1[bias1], w0[bias0]) and bias1 > bias0
    assert grew == 6  # user_id, movie_id and genres, in the wide group and in the deep groups


@pytest.mark.parametrize("override, words", [
    ("features.crosses.gender_movie.hash_buckets=400", "gender_movie has 500 hashed rows there, 400 now"),
    ("model.deep.hidden=[16]", "holds another model: hidden is [32, 16] there, [16] now"),
    ("optim.deep.name=adagrad", "saved with another optimiser"),
])
def test_a_warm_start_refuses_what_it_cannot_honour(tiny_config, override, words, capsys):
    runs = tiny_config.parent / "runs"
    assert main(["train", "--config", str(tiny_config), "train.epochs=1", "run.name=day1"]) == 0
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=words.replace("[", r"\[").replace("]", r"\]")):
        Trainer(load_config(tiny_config, [override, f"train.init_from={runs / 'day1'}", "run.name=day2"]),
                init_distributed("cpu"))


def test_a_vocabulary_that_renumbers_a_value_is_refused(tiny_config, tiny_data, tmp_path):
    """A data set not descended from the one trained on, whose vocabulary moved a known value."""
    runs = tiny_config.parent / "runs"
    old = tmp_path / "vocab-old"
    shutil.copytree(tiny_data, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / "vocab").mkdir()
    (old / "vocab" / "gender.json").write_text(json.dumps([None, "f", "m"]))
    m["columns"]["gender"]["vocab_file"] = "vocab/gender.json"
    (old / "manifest.json").write_text(json.dumps(m))
    new = tmp_path / "vocab-new"
    shutil.copytree(old, new)
    (new / "vocab" / "gender.json").write_text(json.dumps([None, "m", "f"]))
    m["name"] = "other"  # another data set: not this one, nor a descendant
    (new / "manifest.json").write_text(json.dumps(m))
    assert main(["train", "--config", str(tiny_config), f"data.path={old}", "train.epochs=1", "run.name=day1"]) == 0
    with pytest.raises(CheckpointError, match=r"gender's vocabulary is not an extension .*\(id 1 was 'f' there, 'm' now\)"):
        Trainer(load_config(tiny_config, [f"data.path={new}", f"train.init_from={runs / 'day1'}", "run.name=day2"]),
                init_distributed("cpu"))


def test_refusal_on_the_command_line_is_one_line(tiny_config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wdl.cli", "train", "--config", str(tiny_config),
                           "--init-from", str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    one_line_error(proc.stderr, "nowhere")


def test_eval_before_training_scores_the_incoming_model_on_the_new_rows(tiny_config, tiny_data, tmp_path):
    runs = tiny_config.parent / "runs"
    assert main(["train", "--config", str(tiny_config), "train.epochs=2", "run.name=day1"]) == 0
    grown = grown_copy(tiny_data, tmp_path / "grown", {"user_id": 3})
    for name, init in (("warm", ["--init-from", str(runs / "day1")]), ("cold", [])):
        assert main(["train", "--config", str(tiny_config), f"data.path={grown}", "train.epochs=1",
                     "train.eval_before_training=true", f"run.name={name}", *init]) == 0
    first = {n: json.loads((runs / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("warm", "cold")}
    for r in first.values():
        assert r["kind"] == "eval" and r["step"] == 0 and r["before_training"] and r["eval_split"] == "train"
        assert r["rows"] > 2000
    # yesterday's model knows today's rows; a fresh one is at chance
    assert first["warm"]["auc"] > 0.6 > first["cold"]["auc"]


# ---------------------------------------------------------- across world sizes (torchrun)
# The backends as tests/test_distributed.py runs them: TorchRec's user table split column-wise.
TORCHREC = RUN_TORCHREC if torchrec_available() else []
FUSED = RUN_FUSED


def launch(config: Path, nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max-restarts=0", str(ROOT / "launch" / "train.py"), "--config", str(config),
           "run.collective_timeout_s=90", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert proc.returncode == 0, "\n".join(said) or proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_warm_start_across_world_sizes(tiny_config, tiny_data, tmp_path, two_rank_run):
    """2 ranks -> 1 with wdl's row-split tables and 1 rank -> 2 with TorchRec's (where it is
    installed; every rank takes part in each grown table's load, or DCP hangs): the warm-started model, its tables grown, scores the test rows as
    the model it started from did. The 2-rank run is the session's uninterrupted one (conftest.py's
    two_rank_run: the tiny config with wdl's tables, 2 epochs), which test_distributed.py checks."""
    runs = tiny_config.parent / "runs"
    grown = grown_copy(tiny_data, tmp_path / "grown", {"user_id": 7, "movie_id": 3})
    two_to_one, one_to_two = FUSED, TORCHREC or FUSED
    two, _ = two_rank_run(two_to_one)
    assert main(["train", "--config", str(tiny_config), *two_to_one, f"data.path={grown}", "train.eval_only=true",
                 f"train.init_from={two}", "run.name=two-to-one"]) == 0
    assert main(["train", "--config", str(tiny_config), *one_to_two, "train.epochs=1", "run.name=one"]) == 0
    launch(tiny_config, 2, *one_to_two, f"data.path={grown}", "train.eval_only=true",
           f"train.init_from={runs / 'one'}", "run.name=one-to-two")
    for src, dst in ((two, "two-to-one"), (runs / "one", "one-to-two")):
        before, after = records(src)[-1], json.loads((runs / dst / "eval.json").read_text())
        assert after["auc"] == pytest.approx(before["auc"], abs=1e-6), src
        assert after["logloss"] == pytest.approx(before["logloss"], abs=1e-6), src


# ------------------------------------------------------------------------- days and the suite
def test_generate_days_grow_ids_and_record_their_lineage(tmp_path):
    from wdl.ingest.synthetic import generate

    s = generate("movielens", 3000, tmp_path / "days", days=3, progress=False)
    days = [load_manifest(tmp_path / "days" / f"day-{d:02d}") for d in (1, 2, 3)]
    sizes = [m.columns["user_id"]["vocab_size"] for m in days]
    assert sizes[0] < sizes[1] < sizes[2] and days[0].columns["movie_id"]["vocab_size"] < days[2].columns["movie_id"]["vocab_size"]
    assert [m.raw["lineage"] for m in days] == [[], [days[0].identity], [days[0].identity, days[1].identity]]
    for d, m in enumerate(days, start=1):
        assert 0.5 < m.raw["bayes_optimal_auc"] < 1.0 and m.raw["planted"]["day"]["day"] == d
        users = read_split(m.root, "train").column("user_id").to_numpy()
        assert users.max() < m.columns["user_id"]["vocab_size"]
        if d > 1:  # a 15% share of the rows from today's new users
            assert 0.1 < (users >= m.raw["planted"]["day"]["new_users_from"]).mean() < 0.2
    assert s["bayes_optimal_auc"] == [m.raw["bayes_optimal_auc"] for m in days]


def wdl_in_this_process_after_the_first_training(monkeypatch) -> list[str]:
    """The continual benchmark runs each `wdl` command as a subprocess (its _call): `data generate`
    and the first `wdl train` still do; the other ten `wdl train` runs (trainings and scorings)
    run the same command in this process, their output in the same log, so the suite does not
    pay a new Python and torch, TorchRec and scikit-learn import (about 7 s of a CPU) for each.
    The commands run, one per call, in order."""
    from contextlib import redirect_stderr, redirect_stdout

    from benchmarks.scripts import continual

    real, said = continual._call, []

    def call(args: list[str], log: Path) -> None:
        said.append(" ".join(args[:2]))
        if args[0] != "train" or sum(s.startswith("train") for s in said) == 1:
            return real(args, log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f, redirect_stdout(f), redirect_stderr(f):
            rc = main(args)
        assert rc == 0, log.read_text()[-3000:]

    monkeypatch.setattr(continual, "_call", call)
    return said


@pytest.mark.slow
def test_the_continual_suite_runs_in_small(tmp_path, monkeypatch):
    from benchmarks.scripts.continual import run_continual
    from benchmarks.suite import load_suite

    said = wdl_in_this_process_after_the_first_training(monkeypatch)
    suite = load_suite("continual", ["days=3", "rows_per_day=3000", "epochs=1", f"data.path={tmp_path / 'days'}",
                                     "model.deep.hidden=[16]", "data.batch_size=256"])
    result = run_continual(suite, tmp_path / "out")
    assert [r["day"] for r in result["per_day"]] == [1, 2]
    first, second = result["per_day"]
    assert first["frozen_auc"] == first["warm_auc"] == first["full_auc"]  # after day 1 they are one model
    assert second["warm_rows_trained"] < second["full_rows_trained"] and second["frozen_rows_trained"] == first["warm_rows_trained"]
    for r in result["per_day"]:
        assert all(0.5 < r[f"{s}_auc"] < 1 for s in ("warm", "full", "frozen"))
    assert (tmp_path / "out" / "report.md").read_text().startswith("# continual: 3 days")
    assert set(result["summary"]["mean_next_day_auc"]) == {"warm", "full", "frozen"}
    # generated once; trained 5 times (warm each day, full on days 2 and 3), scored 3 x 2 times
    assert said == ["data generate"] + ["train --config"] * 11
    assert (tmp_path / "out" / "logs" / "warm-01.log").read_text().startswith("wdl: ")  # the real subprocess's log
