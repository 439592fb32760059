"""Planned points beside measured ones: `wdl plan`'s estimate for each scaling point, and for
world sizes beyond what the machine can run (marked as planned everywhere they appear).

The estimate uses this machine's measured memory bandwidth and matmul FLOP/s (benchmarks.floors,
with the suite's threads) for the look-ups and the MLP, and TorchRec's default link bandwidths.
One rank per device is assumed, so where the measured points put several processes on fewer
cores than ranks, measured ÷ planned also counts that sharing.

    python -m benchmarks.planned RESULT_DIR     # add planned points to a stored result, redo report and plots
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from wdl.train.metrics import finite_json

PLANNED_WORLD_SIZES = (8, 16, 32, 64, 128)


def planned_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One estimate per (scaling system, world size): the measured ones and PLANNED_WORLD_SIZES."""
    import torch

    from benchmarks import floors
    from benchmarks.suite import system_config
    from wdl.config import load_config
    from wdl.distributed.planning import Hardware
    from wdl.train.build import plan

    suite = result["suite_config"]
    gpus = bool(result["machine"].get("gpus"))
    device = "cuda" if gpus else "cpu"
    if suite.get("threads"):
        torch.set_num_threads(int(suite["threads"]))
    hw = result.get("hardware") or (floors.machine(torch.device(device)) if torch.cuda.is_available() or not gpus
                                    else None)
    points = []
    for system in suite["systems"]:
        if system.get("kind") != "wdl" or not system.get("scaling") or not system.get("enabled", True):
            continue
        cfg_path, overrides = system_config({**suite, "trainer_overrides": suite.get("trainer_overrides", [])}, system)
        cfg = load_config(cfg_path, overrides)
        base = int(system.get("batch_size") or cfg.data.batch_size)
        for ws in sorted({*system.get("world_sizes", [1]), *PLANNED_WORLD_SIZES}):
            per_rank = base // ws if system["scaling"] == "strong" else base
            if per_rank < 1:
                continue
            machine = Hardware(device, ws, 8, ddr_gib=64.0,
                               ddr_bw=hw["memory_bandwidth_gbs"] if hw and device == "cpu" else None,
                               hbm_bw=hw["memory_bandwidth_gbs"] if hw and device == "cuda" else None,
                               peak_tflops=hw["peak_gflops"] / 1e3 if hw else None)
            p = plan(cfg, machine, batch_size=per_rank)
            points.append({"group": system["name"], "world_size": ws, "batch_size": per_rank,
                           "measured": ws in system.get("world_sizes", [1]),
                           "planned_samples_per_second": p["samples_per_second"], "planned_step_ms": p["step_ms"],
                           "device": device, "bandwidth_gbs": p["assumptions"]["ddr_bw_gbs" if device == "cpu"
                                                                              else "hbm_bw_gbs"],
                           "peak_tflops": p["dense"]["peak_tflops"]})
    return points


def add_planned(result: dict[str, Any]) -> None:
    """Put planned points into `result` (nothing when TorchRec, which the planner needs, is missing)."""
    try:
        result["planned"] = planned_points(result)
    except ImportError as e:
        result.setdefault("notes", []).append(f"no planned points: {e}")


def main(argv: list[str]) -> int:
    from benchmarks import plots, report

    out = Path(argv[0])
    path = out / "results.json" if out.is_dir() else out
    result = json.loads(path.read_text())
    add_planned(result)
    result["plots"] = plots.make_plots(result, path.parent)
    (path.parent / "report.md").write_text(report.render(result))
    path.write_text(finite_json(result, indent=2, default=str) + "\n")
    print(f"bench: {len(result.get('planned', []))} planned points added to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
