"""Intra-op threads: the choice (cores, quota, ranks, workers, train.threads, OMP_NUM_THREADS), the
load follower, and the line a run prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, one_line_error, records, side_by_side
from wdl.distributed import threads as T
from wdl.errors import ConfigError

TWO = T.Cores(2, "2 cores in this process's affinity", frozenset({0, 1}), False)


def test_train_threads_beats_the_environment_which_beats_the_choice():
    assert T.choose_threads(3, 1, 0, TWO, {"OMP_NUM_THREADS": "1"}) == T.ThreadChoice(3, "train.threads", False)
    omp = T.choose_threads(0, 1, 0, TWO, {"OMP_NUM_THREADS": "1"})
    assert (omp.threads, omp.follow_load) == (1, False) and "OMP_NUM_THREADS=1 in the environment" in omp.why
    assert T.choose_threads(0, 1, 0, TWO, {"OMP_NUM_THREADS": "4,2"}).threads == 4  # a list per nesting level
    auto = T.choose_threads(0, 1, 0, TWO, {})
    assert auto.threads == 2 and auto.why.startswith("2 cores in this process's affinity")


@pytest.mark.parametrize("cores, ranks, workers, expected", [
    (16, 1, 0, 16), (16, 4, 0, 4), (16, 4, 2, 2), (16, 8, 3, 1), (2, 2, 0, 1), (2, 1, 4, 1), (3, 2, 0, 1)])
def test_the_cores_are_shared_by_local_ranks_less_loader_workers(cores, ranks, workers, expected):
    c = T.Cores(cores, f"{cores} cores", frozenset(range(cores)), False)
    choice = T.choose_threads(0, ranks, workers, c, {})
    assert choice.threads == expected
    assert (f"/ {ranks} ranks" in choice.why) == (ranks > 1) and (f"- {workers} loader" in choice.why) == (workers > 0)


@pytest.mark.parametrize("requested, env, message", [
    (-1, {}, "train.threads=-1: must be >= 0"),
    (0, {"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS='abc' in the environment is not a whole number"),
    (0, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0'"),
])
def test_bad_counts_are_one_line_errors(requested, env, message):
    with pytest.raises(ConfigError, match=message) as e:
        T.choose_threads(requested, 1, 0, TWO, env)
    assert "\n" not in str(e.value)


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    assert T.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert T.cgroup_quota(tmp_path) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert T.cgroup_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert T.cgroup_quota(v1) == 3.0
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    cores = T.available_cores(tmp_path)
    if len(os.sched_getaffinity(0)) > 1:
        assert (cores.count, cores.by_quota) == (1, True) and "cgroup CPU quota 0.5" in cores.why


@pytest.mark.parametrize("foreign, expected", [(0.0, 4), (0.3, 4), (0.35, 3), (1.0, 3), (1.4, 2), (2.9, 1), (9.0, 1)])
def test_each_core_mostly_taken_by_others_is_a_thread_fewer(foreign, expected):
    assert T.threads_for(4, 4, foreign) == expected
    assert T.threads_for(2, 4, foreign) == min(2, expected)  # never above the cap (other ranks' share)


class FakeClock:
    def __init__(self):
        self.wall, self.cpu = 100.0, 5.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.cpu


def write_stat(path, busy0, busy1, idle=1000):
    """/proc/stat with these busy jiffies (user) on cpu0 and cpu1, and a cpu2 outside our set."""
    path.write_text(f"cpu  {busy0 + busy1} 0 0 {3 * idle} 0 0 0 0 0 0\n"
                    f"cpu0 {busy0} 0 0 {idle} 7 0 0 0 0 0\ncpu1 {busy1} 0 0 {idle} 7 0 0 0 0 0\n"
                    f"cpu2 999999 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n")


def test_the_follower_drops_a_thread_beside_a_busy_process_and_takes_it_back(tmp_path, monkeypatch):
    clock, stat = FakeClock(), tmp_path / "stat"
    monkeypatch.setattr(T, "time", clock)
    write_stat(stat, 0, 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        f = T.LoadFollower(2, frozenset({0, 1}), interval_s=0.5, stat=stat)
        tick = f._tick  # jiffies per second
        # Within the interval nothing is read.
        clock.wall += 0.1
        assert f.tick() == 2 and f.changes == 0
        # One second: our CPUs were busy 1.9 s, 0.9 s of it ours: another process took a core.
        clock.wall += 0.9
        clock.cpu += 0.9
        write_stat(stat, int(1.0 * tick), int(0.9 * tick))
        assert f.tick() == 1 and torch.get_num_threads() == 1 and f.changes == 1
        # The other process leaves: every busy second is ours.
        clock.wall += 1.0
        clock.cpu += 1.0
        write_stat(stat, int(1.5 * tick), int(1.4 * tick))
        assert f.tick() == 2 and torch.get_num_threads() == 2 and f.changes == 2
    finally:
        torch.set_num_threads(before)


def _train(tmp_path, config, env_changes, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_changes, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config),
           "train.epochs=1", "train.max_steps=3", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_a_run_says_its_choice_once_and_train_threads_overrides(tmp_path, tiny_config):
    auto, fixed = side_by_side(lambda: _train(tmp_path, tiny_config, {}, "run.name=auto"),
                               lambda: _train(tmp_path, tiny_config, {"OMP_NUM_THREADS": "3"}, "run.name=fixed",
                                              "train.threads=1"))
    assert auto.returncode == 0, auto.stderr
    lines = [x for x in auto.stdout.splitlines() if "intra-op threads" in x]
    cores = len(os.sched_getaffinity(0))
    assert len(lines) == 1 and lines[0].startswith(f"wdl: {cores} intra-op threads ({cores} cores in this process"), lines
    assert 1 <= records(tmp_path / "runs" / "auto")[0]["intra_op_threads"] <= cores

    assert fixed.returncode == 0, fixed.stderr
    assert [x for x in fixed.stdout.splitlines() if "intra-op threads" in x] == ["wdl: 1 intra-op threads (train.threads)"]
    assert records(tmp_path / "runs" / "fixed")[0]["intra_op_threads"] == 1


def test_the_environment_is_respected_and_said(tmp_path, tiny_config):
    r = _train(tmp_path, tiny_config, {"OMP_NUM_THREADS": "1"}, "run.name=omp")
    assert r.returncode == 0, r.stderr
    line, = [x for x in r.stdout.splitlines() if "intra-op threads" in x]
    assert line.startswith("wdl: 1 intra-op threads (OMP_NUM_THREADS=1 in the environment")


def test_a_negative_count_is_one_line(tiny_config, capsys):
    from wdl.cli import main

    assert main(["train", "--config", str(tiny_config), "run.name=bad", "train.threads=-2"]) == 2
    one_line_error(capsys.readouterr().err, "train.threads=-2: must be >= 0")
    assert not (tiny_config.parent / "runs" / "bad").exists()


def test_bench_threads_not_a_number_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "run", "movielens-100k", "threads=abc",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    one_line_error(r.stderr, "threads='abc' must be a whole number >= 0")
    assert not (tmp_path / "out").exists()


def test_contention_variants_name_a_count_and_its_environment():
    from benchmarks.scripts.contention import variant

    assert variant("auto") == ([], {})
    assert variant("2+GOMP_SPINCOUNT=10000+OMP_WAIT_POLICY=PASSIVE") == (
        ["train.threads=2"], {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": "PASSIVE"})
    for bad in ("abc", "0", "2+", "auto+=1"):
        with pytest.raises(ValueError, match="auto or a thread count"):
            variant(bad)
