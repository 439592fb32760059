"""Training-step time of config variants side by side, in one process, against the bare MLP floor.

    python -m benchmarks.scripts.step_variants --config configs/movielens-100k.yaml \\
        --variant "eager=model.embedding_backend=torch" \\
        --variant "compiled=model.embedding_backend=torch train.compile=default" [--reps 8] [--out F.json]

Each variant is the config with its overrides, built as `wdl train` builds it (Trainer), and
trained on its own train split. All variants and two floors take turns: the bare MLP
80-256-128-64-1 (Adam, batch 1024: benchmarks.floors.mlp_floor_step), and the bare MLP of the
first variant's own shape (its MLP input width and hidden layers, the same step otherwise), so
that a step can be read against the MLP it cannot avoid as well as against the fixed one. They
take turns, `--steps` steps each per round, so a noisy
neighbour slows them alike; the report is each one's median ms per step over the rounds after
the first, and its ratio to the floor's. Before timing, each variant trains `--warmup` steps
(past compilation and an epoch's last, smaller batch). Also reported: operations per step (aten
ops at the top of the dispatcher plus compiled-kernel calls; on a GPU, the CUDA kernels,
memcpys and host syncs of benchmarks.floors.cuda_launches).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks.floors import cuda_launches, mlp_floor_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scripts.step_variants", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the config every variant starts from")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE [KEY=VALUE ...]",
                   help="a named list of overrides, space-separated (repeatable; default: the config as it is)")
    p.add_argument("--reps", type=int, default=8, help="rounds of turns (the first is not counted)")
    p.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=150, help="steps each variant trains before timing")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    return p.parse_args(argv)


def variants(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs or ["config="]:
        name, _, overrides = spec.partition("=")
        out[name] = overrides.split()
    return out


def trainer_step(config: str, overrides: list[str], env: Any) -> tuple[Callable[[], Any], Any]:
    """A step of the config's Trainer over its train split, epoch after epoch; and the Trainer."""
    from wdl.config import load_config
    from wdl.train.trainer import Trainer

    tr = Trainer(load_config(config, ["run.out_dir=/tmp/step-variants-runs", "train.progress=false", *overrides]), env)
    tr.model.train()

    def batches() -> Iterator[Any]:
        epoch = 0
        while True:
            tr.train_loader.set_epoch(epoch)
            tr.train_loader.load_state_dict({"epoch": epoch, "batches_done": 0})
            yield from tr.train_loader
            epoch += 1

    it = batches()
    return (lambda: tr.train_step(next(it))), tr


def ops_per_step(step: Callable[[], Any], steps: int = 5) -> float:
    """aten ops at the top of the dispatcher (not inside another) and compiled-kernel calls, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    count = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent.name if e.cpu_parent is not None else ""
        if (e.name.startswith("aten::") or "ompiled" in e.name) and not (parent.startswith("aten::") or "ompiled" in parent):
            count[e.name] += 1
    return sum(count.values()) / steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from wdl.distributed.env import init_distributed

    torch.set_num_threads(args.threads)
    env = init_distributed("auto")
    steps: dict[str, Callable[[], Any]] = {}
    extra: dict[str, dict[str, Any]] = {}
    own_mlp: tuple[int, list[int]] | None = None
    for name, overrides in variants(args.variant).items():
        step, tr = trainer_step(args.config, overrides, env)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        extra[name] = {"overrides": overrides, "warmup_seconds": round(time.perf_counter() - start, 2),
                       "ops_per_step": ops_per_step(step), "device": str(tr.device)}
        if tr.device.type == "cuda":
            extra[name].update(cuda_launches(lambda _: step(), [None] * 5))
        steps[name] = step
        if own_mlp is None and tr.wide_deep.deep is not None:
            linear = [m for m in tr.wide_deep.deep.mlp if isinstance(m, torch.nn.Linear)]
            own_mlp = (linear[0].in_features, [m.out_features for m in linear[:-1]])
        print(f"{name}: built and warmed up in {extra[name]['warmup_seconds']} s, "
              f"{extra[name]['ops_per_step']:.0f} ops per step", flush=True)
    floors = {"mlp floor": (80, [256, 128, 64])}
    if own_mlp is not None and own_mlp != floors["mlp floor"]:
        floors[f"mlp floor {'-'.join(map(str, [own_mlp[0], *own_mlp[1], 1]))}"] = own_mlp
    for name, (width, hidden) in floors.items():
        floor = mlp_floor_step(input_dim=width, hidden=hidden, batch_size=1024, steps=79, device=env.device)
        counter = iter(range(10**9))
        steps[name] = lambda floor=floor, counter=counter: floor(next(counter) % 79)
        extra[name] = {"input_dim": width, "hidden": hidden}
    times: dict[str, list[float]] = {k: [] for k in steps}
    load = [os.getloadavg()[0]]
    for _ in range(args.reps):
        for name, step in steps.items():
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    own = next((k for k in floors if k != "mlp floor"), None)
    result = {"config": args.config, "threads": args.threads, "load_1min": [round(x, 2) for x in load],
              "variants": {k: {"ms_per_step": round(med[k], 3), "ratio_to_floor": round(med[k] / med["mlp floor"], 3),
                               **({"ratio_to_own_mlp_floor": round(med[k] / med[own], 3)} if own else {}),
                               "ms_per_round": [round(x, 2) for x in times[k]], **extra.get(k, {})} for k in steps}}
    print(f"1-minute load during the rounds: {min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores")
    for k in steps:
        mine = f"  x{med[k] / med[own]:.2f} of its own MLP's" if own else ""
        print(f"{k:28s} {med[k]:7.2f} ms per step  x{med[k] / med['mlp floor']:.2f} of the floor{mine}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
