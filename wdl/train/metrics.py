"""Run records: `metrics.jsonl`, `summary.json`, the table printed to the console, and the
train loss sums they are made of. Only rank 0 writes or prints.

metrics.jsonl holds one JSON object per line, by `kind`:
    epoch  at each epoch's end (and where a run stops mid-epoch): today's fields, the
           evaluation's among them when evaluations are at epoch ends (train.eval_every_steps=0)
    eval   every train.eval_every_steps steps: the evaluation, and the train loss since the last one
    step   every train.log_every_steps steps: train loss over those steps, rows, rate, samples/s
Values that are not finite are written as null (JSON has no NaN), with a note where it says why.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from wdl.distributed.env import all_reduce_sum

COLUMNS = [  # (key, header, format)
    ("epoch", "epoch", "{:>5d}"),
    ("train_loss", "train loss", "{:>10.4f}"),
    ("auc", "test AUC", "{:>8.4f}"),
    ("logloss", "logloss", "{:>7.4f}"),
    ("calibration", "calib", "{:>5.3f}"),
    ("train_seconds", "s/epoch", "{:>7.2f}"),
    ("samples_per_second", "samples/s", "{:>9.0f}"),
]


def finite_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps with every NaN / inf written as null: strict JSON readers refuse NaN. An AUC
    that is undefined (a split of one class) gets an `auc_note` saying so."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {k: _finite(v) for k, v in obj.items()}
        if "auc" in obj and out["auc"] is None and "auc_note" not in obj:
            out["auc_note"] = "undefined: every label of the split is the same"
        return out
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def is_evaluation(r: dict[str, Any]) -> bool:
    """An epoch record with its evaluation in it, or an eval record."""
    return r.get("kind", "epoch") in ("epoch", "eval") and "eval_seconds" in r


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, eval_split: str = "test", tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.records: list[dict[str, Any]] = []
        self.header_printed = False
        self.eval_split = eval_split
        self.writer = None
        if tensorboard and enabled:  # checked at start: the package is there (wdl.train.trainer)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def load_existing(self, step: int, epochs: int) -> None:
        """On resume from a checkpoint at `step` after `epochs` whole epochs: keep the records it
        covers and drop those logged after it (they are made again), and an evaluation made only
        because a run stopped there (`interim`), so each record appears once, as in an uncut run."""
        if self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if _covered(r, step, epochs)]
            if self.enabled and len(self.records) != len(records):
                self.path.write_text("".join(finite_json(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any], bar: Any = None) -> None:
        """Append `record` (its `kind` set) to metrics.jsonl, and show it: epochs as table rows,
        evaluations as a line, steps on the progress bar (a line without one)."""
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(finite_json(record) + "\n")
        kind = record["kind"]
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{kind}/{k}", v, record["step"])
            self.writer.flush()
        if kind == "epoch":
            if not self.header_printed:
                headers = [h.replace("test", self.eval_split) for _, h, _ in COLUMNS]
                print(" | ".join(f"{h:>{_width(fmt)}}" for h, (_, _, fmt) in zip(headers, COLUMNS)))
                self.header_printed = True
            print(" | ".join(_fmt(fmt, record.get(k)) for k, _, fmt in COLUMNS), flush=True)
        elif kind == "eval":
            print(f"step {record['step']} (epoch {record['epoch']}): {self.eval_split} AUC {_num(record.get('auc'))} "
                  f"logloss {_num(record.get('logloss'))}; train loss {_num(record.get('train_loss_since_last_eval'))} "
                  "since the last", flush=True)
        elif bar is not None:
            bar.set_postfix(loss=f"{_num(record['train_loss'])}", lr=f"{record['lr_scale']:.3g}", refresh=False)
        else:
            print(f"step {record['step']} (epoch {record['epoch']}): train loss {_num(record['train_loss'])}, "
                  f"lr x{record['lr_scale']:.3g}, {record['samples_per_second']:.0f} samples/s", flush=True)

    def write_summary(self, extra: dict[str, Any], selection: Any = None, test: dict[str, Any] | None = None,
                      test_split: str = "test") -> dict[str, Any]:
        """With a `selection` (validation protocol): the selected evaluation and its `test`
        scores; without: the evaluation of best AUC on the split scored during training."""
        epochs = [r for r in self.records if r.get("kind", "epoch") == "epoch"]
        scored = [r for r in self.records if is_evaluation(r) and _finite(r.get("auc")) is not None]
        best = max(scored, key=lambda r: r["auc"]) if scored else None
        summary = {
            "epochs": len(epochs),
            "selected_on": self.eval_split,
            "best_auc": best["auc"] if best else None,  # on selected_on
            "best_epoch": best["epoch"] if best else None,
            "best_step": best.get("step") if best else None,
            "final": epochs[-1] if epochs else None,
            "mean_train_seconds": (sum(r["train_seconds"] for r in epochs) / len(epochs)) if epochs else None,
            **extra,
        }
        if selection is not None:
            summary["best_epoch"], summary["best_step"] = selection.best_epoch, selection.best_step
            summary[f"best_{selection.cfg.metric}"] = selection.best_value
        if selection is not None or test is not None:  # without selection: scored once at its end (train.refit)
            summary["test_split"], summary["test"] = test_split, test
        if self.enabled:
            self.summary_path.write_text(finite_json(summary, indent=2) + "\n")
            if selection is not None and selection.best_epoch is not None and test is not None:
                print(f"best {selection.describe()}; {test_split} AUC of that model {_num(test['auc'])} "
                      f"(scored once); results in {self.path.parent}")
            elif selection is None and test is not None:
                print(f"{test_split} AUC {_num(test['auc'])} after {len(epochs)} epochs (scored once); "
                      f"results in {self.path.parent}")
            elif best:
                where = f"epoch {best['epoch']}" if best.get("kind", "epoch") == "epoch" else \
                    f"step {best['step']} (epoch {best['epoch']})"
                print(f"best {self.eval_split} AUC {best['auc']:.4f} at {where}; results in {self.path.parent}")
        if self.writer is not None:
            self.writer.close()
        return summary


def _covered(r: dict[str, Any], step: int, epochs: int) -> bool:
    if r.get("kind", "epoch") == "epoch":
        return r["epoch"] <= epochs
    return r["step"] <= step and not r.get("interim", False)


class TrainSums:
    """The train loss summed on the device (no host read per step) over four windows: the epoch,
    the log interval, the evaluation interval and the whole run; the rows of each counted on the
    host. `totals` reads them once, summed over ranks. A checkpoint saves them summed over ranks
    and restores them on rank 0 (the others start from zero), so a resumed window reports all of it."""

    WINDOWS = ("epoch", "log", "eval", "run")

    def __init__(self, device: torch.device, is_main: bool) -> None:
        self.loss = torch.zeros(len(self.WINDOWS), dtype=torch.float64, device=device)
        self.rows = [0] * len(self.WINDOWS)
        self.is_main = is_main
        self.epoch_lr_scale = 1.0  # the schedule's multiplier at the epoch's first step
        self.last_eval_loss = math.nan  # the previous evaluation interval's mean loss
        self.started = {w: time.perf_counter() for w in self.WINDOWS}  # wall clock: not saved

    def add(self, loss: torch.Tensor, rows: int) -> None:
        """loss: the batch's mean loss, a scalar on the device."""
        self.loss += loss * rows
        self.rows = [r + rows for r in self.rows]

    def reset(self, window: str) -> None:
        i = self.WINDOWS.index(window)
        self.loss[i] = 0.0
        self.rows[i] = 0
        self.started[window] = time.perf_counter()

    def totals(self, *windows: str) -> list[tuple[float, int]]:
        """(mean loss, rows) of each window over all ranks: one read of the device, one
        collective (every rank calls it)."""
        idx = [self.WINDOWS.index(w) for w in windows]
        rows = torch.tensor([float(self.rows[i]) for i in idx], dtype=torch.float64)
        both = all_reduce_sum(torch.cat([self.loss[idx].cpu(), rows])).cpu().tolist()
        k = len(idx)
        return [(loss / max(n, 1.0), int(n)) for loss, n in zip(both[:k], both[k:])]

    def seconds(self, window: str) -> float:
        return time.perf_counter() - self.started[window]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A collective: every rank calls it."""
        sums = all_reduce_sum(torch.cat([self.loss.cpu(), torch.tensor(self.rows, dtype=torch.float64)])).cpu()
        return {"sums": torch.cat([sums, torch.tensor([self.epoch_lr_scale, self.last_eval_loss], dtype=torch.float64)])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        values, n = state["sums"].tolist(), len(self.WINDOWS)
        keep = 1.0 if self.is_main else 0.0
        self.loss.copy_(torch.tensor([v * keep for v in values[:n]], dtype=torch.float64))
        self.rows = [int(v * keep) for v in values[n: 2 * n]]
        self.epoch_lr_scale, self.last_eval_loss = values[2 * n], values[2 * n + 1]


def _width(fmt: str) -> int:
    return len(fmt.format(0) if "d" in fmt else fmt.format(0.0))


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return " " * (_width(fmt) - 1) + "-"
    return fmt.format(value)


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"
