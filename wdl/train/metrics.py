"""Run records: `metrics.jsonl` (one JSON object per epoch), `summary.json`, and the table
printed to the console. Only rank 0 writes or prints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = [  # (key, header, format)
    ("epoch", "epoch", "{:>5d}"),
    ("train_loss", "train loss", "{:>10.4f}"),
    ("auc", "test AUC", "{:>8.4f}"),
    ("logloss", "logloss", "{:>7.4f}"),
    ("calibration", "calib", "{:>5.3f}"),
    ("train_seconds", "s/epoch", "{:>7.2f}"),
    ("samples_per_second", "samples/s", "{:>9.0f}"),
]


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, eval_split: str = "test") -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.records: list[dict[str, Any]] = []
        self.header_printed = False
        self.eval_split = eval_split

    def load_existing(self, keep_epochs: int) -> None:
        """On resume: keep the records of the `keep_epochs` epochs the checkpoint covers and drop
        any logged after it (they are trained again), so every epoch appears once."""
        if self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if r["epoch"] <= keep_epochs]
            if self.enabled and len(self.records) != len(records):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.header_printed:
            headers = [h.replace("test", self.eval_split) for _, h, _ in COLUMNS]
            print(" | ".join(f"{h:>{len(fmt.format(0) if 'd' in fmt else fmt.format(0.0))}}" for h, (_, _, fmt) in zip(headers, COLUMNS)))
            self.header_printed = True
        print(" | ".join(_fmt(fmt, record.get(k)) for k, _, fmt in COLUMNS), flush=True)

    def write_summary(self, extra: dict[str, Any], selection: Any = None, test: dict[str, Any] | None = None,
                      test_split: str = "test") -> dict[str, Any]:
        """With a `selection` (validation protocol): the selected epoch and its `test` scores;
        without: the epoch of best AUC on the split scored every epoch."""
        scored = [r for r in self.records if r.get("auc") is not None and not math.isnan(r["auc"])]
        best = max(scored, key=lambda r: r["auc"]) if scored else None
        summary = {
            "epochs": len(self.records),
            "selected_on": self.eval_split,
            "best_auc": best["auc"] if best else None,  # on selected_on
            "best_epoch": best["epoch"] if best else None,
            "final": self.records[-1] if self.records else None,
            "mean_train_seconds": (sum(r["train_seconds"] for r in self.records) / len(self.records)) if self.records else None,
            **extra,
        }
        if selection is not None:
            summary["best_epoch"] = selection.best_epoch
            summary[f"best_{selection.cfg.metric}"] = selection.best_value
            summary["test_split"], summary["test"] = test_split, test
        if self.enabled:
            self.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
            if selection is not None and selection.best_epoch is not None and test is not None:
                print(f"best {selection.describe()}; {test_split} AUC of that model {_num(test['auc'])} "
                      f"(scored once); results in {self.path.parent}")
            elif best:
                print(f"best {self.eval_split} AUC {best['auc']:.4f} at epoch {best['epoch']}; results in {self.path.parent}")
        return summary


def _fmt(fmt: str, value: Any) -> str:
    width = len(fmt.format(0) if "d" in fmt else fmt.format(0.0))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return " " * (width - 1) + "-"
    return fmt.format(value)


def _num(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"
