"""The `scale` benchmark: one streamed pass over a large planted Criteo-shaped set with torchrun,
killed once in the middle and resumed, watched from outside.

    python -m benchmarks.scripts.scale [--out DIR] [key=value ...]     (or: wdl bench run scale ...)

The settings are benchmarks/suites/scale.yaml; `key=value` items change them as for any suite
(`kill_at=0.3`, `world_size=2`), and trainer keys (`data.path=DIR`, `train.eval_every_steps=100`)
go to the run (`data.path` also replaces the suite's data set: nothing is generated). Steps:

1. generate the data set if it is missing (`wdl data generate`, the suite's arguments);
2. launch `torchrun --nproc_per_node W launch/train.py` with the suite's overrides, read the run's
   metrics.jsonl as it grows, sample VmRSS/VmHWM of every rank from /proc, and SIGKILL the last
   rank once the logged step passes `kill_at` of the pass (torchrun then stops the others);
3. launch again with `--resume auto` and watch it to the end;
4. write results.json, results.csv, plots and report.md into --out (scale_report.py).

The kill comes from outside, as a lost process would, so nothing in the trainer knows of it; the
first attempt's records are kept from before the resume rewrites metrics.jsonl.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import ROOT, describe
from benchmarks.suite import abs_path, script_main
from wdl.errors import ConfigError

POLL_SECONDS = 0.1  # how often metrics.jsonl is read: a kill lands within a step or two of its target
STEPS_LINE = re.compile(r"(\d+) train rows, (\d+) steps/epoch")
RESUMED_LINE = re.compile(r"resumed from (\S+) \(epoch (\d+), step (\d+),")


class Attempt:
    """One launch of torchrun: its process, log, the records it logged and the RSS of its ranks."""

    def __init__(self, number: int, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.number, self.cmd, self.log = number, cmd, log
        self.out = log.open("w")
        # A session of its own: torchrun and its ranks can be stopped together if they hang.
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)
        self.records: list[dict[str, Any]] = []  # as logged, each with `seen_s` (when first read)
        self.killed: dict[str, Any] | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> int:
        try:
            rc = self.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:  # a rank stuck in a collective: stop the whole session
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self.out.close()
        return rc


class Watch:
    """What the benchmark reads while a run goes: new metrics records, and RSS of each rank."""

    def __init__(self, run_dir: Path, sample_seconds: float) -> None:
        self.metrics = run_dir / "metrics.jsonl"
        self.sample_seconds = sample_seconds
        self.t0 = time.monotonic()
        self.seen: set[str] = set()
        self.rss: list[dict[str, Any]] = []
        self.next_sample = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def poll(self, attempt: Attempt) -> None:
        for rec in _read_records(self.metrics):
            key = json.dumps(rec, sort_keys=True)
            if key not in self.seen:  # a resume rewrites the file: records already read are not new
                self.seen.add(key)
                attempt.records.append({**rec, "seen_s": round(self.now(), 2)})
        if self.now() >= self.next_sample:
            self.next_sample = self.now() + self.sample_seconds
            last = last_step(attempt.records)
            load = os.getloadavg()[0]
            for rank, pid in ranks(attempt.proc.pid).items():
                mem = proc_memory_mb(pid)
                if mem:
                    self.rss.append({"t": round(self.now(), 2), "attempt": attempt.number, "rank": rank, "pid": pid,
                                     **mem, "step": last.get("step"), "rows_seen": rows_seen(last),
                                     "load_1m": round(load, 2)})


def ranks(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, from /proc (their RANK environment variable)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != torchrun_pid:
                continue
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(d)
    return out


def proc_memory_mb(pid: int) -> dict[str, float] | None:
    """Resident (VmRSS) and peak resident (VmHWM) memory of one process, in MB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    kb = {k: float(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")}
    return {"rss_mb": kb["VmRSS"] / 1024, "hwm_mb": kb["VmHWM"] / 1024} if len(kb) == 2 else None


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            break
    return out


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "step"]


def last_step(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = step_records(records)
    return steps[-1] if steps else {}


def rows_seen(rec: dict[str, Any]) -> int | None:
    """Rows trained so far in the pass, as the trainer counts them (across ranks)."""
    return rec.get("rows_seen")


def watch(attempt: Attempt, w: Watch, kill_step: int | None = None) -> int:
    """Follow `attempt` to its end; with `kill_step`, SIGKILL its last rank once a step record at or
    past it is read. Its exit status."""
    while attempt.proc.poll() is None:
        w.poll(attempt)
        step = last_step(attempt.records).get("step", 0)
        if kill_step and attempt.killed is None and step >= kill_step:
            pids = ranks(attempt.proc.pid)
            if pids:
                rank = max(pids)
                os.kill(pids[rank], signal.SIGKILL)
                attempt.killed = {"t": round(w.now(), 2), "rank": rank, "pid": pids[rank], "last_logged_step": step,
                                  "target_step": kill_step, "signal": "SIGKILL"}
                print(f"scale: SIGKILL to rank {rank} (pid {pids[rank]}) after step {step}", flush=True)
        time.sleep(POLL_SECONDS)
    rc = attempt.close()
    w.poll(attempt)
    return rc


def run_scale(suite: dict[str, Any], out: Path) -> dict[str, Any]:
    from benchmarks.run import ensure_data
    from benchmarks.scripts.scale_report import write_outputs

    _check(suite)
    run_dir = out / "runs" / "scale"
    if run_dir.exists():
        raise ConfigError(f"{out} already holds a scale run ({run_dir}); give another --out")
    data = _data(suite)
    ensure_data(data)
    if not (abs_path(data["path"]) / "manifest.json").is_file():
        raise ConfigError(f"no data set at {abs_path(data['path'])} (no manifest.json); create it with `wdl data generate`")
    manifest = json.loads((abs_path(data["path"]) / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(int(suite.get("threads") or 1)), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = launch_command(suite, data, out)
    started = dt.datetime.now(dt.timezone.utc)
    w = Watch(run_dir, float(suite.get("sample_seconds", 5)))
    load_before = os.getloadavg()[0]

    first = Attempt(1, cmd, out / "logs" / "attempt-1.log", env)
    print(f"scale: {' '.join(cmd)}", flush=True)
    kill_step = _kill_step(first, w, float(suite["kill_at"]))
    rc1 = watch(first, w, kill_step)
    if first.killed is None:
        raise ConfigError(f"the run ended (exit {rc1}) before step {kill_step}, where it was to be killed; see "
                          f"{first.log}")
    second = Attempt(2, [*cmd, "--resume", "auto"], out / "logs" / "attempt-2.log", env)
    print("scale: resuming with --resume auto", flush=True)
    rc2 = watch(second, w)
    if rc2 != 0:
        raise ConfigError(f"the resumed run failed (exit {rc2}); see {second.log}")

    result = {
        "benchmark": "scale", "suite": suite["name"], "description": suite.get("description"),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.scripts.scale", *suite["overrides"]]),
        "launch": cmd, "machine": describe(), "data": str(abs_path(data["path"])),
        "suite_config": {k: v for k, v in suite.items() if k != "path"},
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "manifest": {"train_rows": manifest["splits"][suite_split(suite, "train")]["rows"],
                     "valid_rows": manifest["splits"].get("valid", {}).get("rows"),
                     "bayes_optimal_auc": manifest.get("bayes_optimal_auc")},
        "steps_per_epoch": _steps(first.text())[1],
        "attempts": [_attempt(a, rc) for a, rc in ((first, rc1), (second, rc2))],
        "resume": _resumed(second.text()),
        "summary_json": json.loads((run_dir / "summary.json").read_text()),
        "rss": w.rss,
    }
    write_outputs(result, out)
    return result


def _check(suite: dict[str, Any]) -> None:
    """The suite's own keys, from its file or `key=value`: one line each, before anything runs."""
    checks = {"world_size": (int, lambda v: v >= 2, "a whole number >= 2 (a rank is killed, one must be left)"),
              "kill_at": (float, lambda v: 0 < v < 1, "a share of the pass in (0, 1)"),
              "sample_seconds": (float, lambda v: v > 0, "seconds > 0"),
              "threads": (int, lambda v: v >= 1, "a whole number >= 1")}
    for key, (kind, ok, what) in checks.items():
        value = suite.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and not isinstance(value, int) \
                or not ok(value):
            raise ConfigError(f"suite {suite['name']!r}: {key}={value!r} must be {what}")


def launch_command(suite: dict[str, Any], data: dict[str, Any], out: Path) -> list[str]:
    """torchrun over W local processes (gloo on a CPU), the suite's overrides, then the command line's."""
    given = [o for o in suite["trainer_overrides"] if not o.startswith("data.path=")]  # `data` holds it
    overrides = [f"data.path={abs_path(data['path'])}", *suite.get("run_overrides", []), *given,
                 f"run.out_dir={out / 'runs'}", "run.name=scale", "train.progress=false"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(suite['world_size'])}",
            "--max-restarts=0", str(ROOT / "launch" / "train.py"), "--config", str(abs_path(suite["config"])),
            *overrides]


def suite_split(suite: dict[str, Any], name: str) -> str:
    return next((o.partition("=")[2] for o in [*suite.get("run_overrides", []), *suite["trainer_overrides"]]
                 if o.startswith(f"data.{name}_split=")), name)


def _data(suite: dict[str, Any]) -> dict[str, Any]:
    """The suite's data set, or the one `data.path=` names (then nothing is generated)."""
    named = [o.partition("=")[2] for o in suite["trainer_overrides"] if o.startswith("data.path=")]
    return {"path": named[-1]} if named else suite["data"]


def _steps(log: str) -> tuple[int, int] | tuple[None, None]:
    """(train rows, steps per epoch) as the trainer announces them on rank 0."""
    m = STEPS_LINE.search(log)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _kill_step(attempt: Attempt, w: Watch, kill_at: float) -> int:
    """The step to kill after: `kill_at` of the pass, once the trainer has said how many steps it has."""
    while attempt.proc.poll() is None:
        _, steps = _steps(attempt.text())
        if steps:
            return max(1, round(kill_at * steps))
        w.poll(attempt)
        time.sleep(POLL_SECONDS)
    rc = attempt.close()
    said = next((line for line in attempt.text().splitlines() if line.startswith("error: ")), "")
    raise ConfigError(f"the run ended (exit {rc}) before it started training{': ' + said[7:] if said else ''}; "
                      f"see {attempt.log}")


def _resumed(log: str) -> dict[str, Any]:
    """Where the second attempt continued from (its own words), and that checkpoint's saved position."""
    m = RESUMED_LINE.search(log)
    if not m:
        raise ConfigError("the second attempt did not resume from a checkpoint (no 'resumed from' line)")
    path = Path(m.group(1))
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    return {"checkpoint": str(path), "epoch": int(m.group(2)), "step": int(m.group(3)),
            "saved": {k: meta.get(k) for k in ("epoch", "step", "batches_done")}}


def _attempt(a: Attempt, rc: int) -> dict[str, Any]:
    return {"attempt": a.number, "exit": rc, "command": a.cmd, "log": str(a.log), "killed": a.killed,
            "records": a.records}


def main(argv: list[str] | None = None) -> int:
    return script_main("benchmarks.scripts.scale", __doc__, run_scale, argv)


if __name__ == "__main__":
    raise SystemExit(main())
