"""`wdl data prepare criteo`: parsing, encodings, splits, workers, and the Criteo config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import ROOT, criteo_line, random_lines, read_split, write_lines
from wdl.cli import main as cli_main
from wdl.config import load_config
from wdl.errors import DataError
from wdl.ingest import criteo_tsv as tsv
from wdl.ingest.criteo import prepare_criteo
from wdl.ingest.criteo_tsv import CATEGORICAL, DENSE
from wdl.model.embeddings import torchrec_available


def test_prepare_hash_values_and_manifest(tmp_path):
    lines = [criteo_line(1, ["3", "", "-5"] + ["0"] * 10, ["68fd1e64", ""] + [f"{i:08X}" for i in range(24)]),
             *random_lines(300)]
    src = write_lines(tmp_path / "train.txt", lines)
    summary = prepare_criteo([src], tmp_path / "out", hash_buckets=1000, test_fraction=0.0, progress=False)
    assert summary["rows"]["train"] == 301 and summary["bad_lines"] == 0
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["format"] == "wdl-dataset/1" and m["label"] == "label"
    assert m["columns"]["C1"] == {"kind": "categorical", "vocab_size": 1000, "encoding": "hash"}
    assert {"mean", "std"} <= set(m["columns"]["I1"]) and m["columns"]["I1"]["transform"] == "log1p"
    t = read_split(tmp_path / "out", "train")
    assert t.schema.field("label").type == "int8" and t.schema.field("I1").type == "float"
    assert t.schema.field("C1").type == "int64"
    first = t.slice(0, 1).to_pylist()[0]
    assert first["I1"] == pytest.approx(np.log1p(3)) and first["I2"] == 0.0 and first["I3"] == 0.0  # missing, clamped
    assert first["C2"] == 0 and 1 <= first["C1"] < 1000  # missing -> 0, hashed ids avoid 0
    ids = np.stack([t.column(c).to_numpy() for c in CATEGORICAL])
    assert ids.min() >= 0 and ids.max() < 1000
    # the same raw value gets the same id in the same column (hex case does not matter)
    again = prepare_criteo([write_lines(tmp_path / "b.txt", [criteo_line(0, cats=["68FD1E64"] * 26)])], tmp_path / "o2",
                           hash_buckets=1000, test_fraction=0.0, progress=False)
    assert again["rows"]["train"] == 1
    assert read_split(tmp_path / "o2", "train").column("C1")[0].as_py() == first["C1"]


def test_dense_transforms(tmp_path):
    src = write_lines(tmp_path / "x.txt", [criteo_line(0, ["-4", "8"] + [""] * 11)])
    for transform, (a, b) in {"log1p": (0.0, np.log1p(8)), "clamp": (0.0, 8.0), "none": (-4.0, 8.0)}.items():
        prepare_criteo([src], tmp_path / transform, dense_transform=transform, test_fraction=0.0, progress=False)
        row = read_split(tmp_path / transform, "train").to_pylist()[0]
        assert (row["I1"], row["I2"], row["I3"]) == pytest.approx((a, b, 0.0))


def test_gzip_and_workers_give_identical_output(tmp_path):
    lines = random_lines(2000, seed=1)
    plain = write_lines(tmp_path / "plain.txt", lines)
    gz = write_lines(tmp_path / "packed.txt", lines, gz=True)  # recognised by its magic bytes, not its name
    prepare_criteo([plain], tmp_path / "a", hash_buckets=500, progress=False)
    prepare_criteo([gz], tmp_path / "b", hash_buckets=500, workers=2, block_bytes=20_000, progress=False)
    for split in ("train", "test"):
        assert read_split(tmp_path / "a", split).equals(read_split(tmp_path / "b", split))
    a = json.loads((tmp_path / "a/manifest.json").read_text())
    assert a["splits"]["test"]["rows"] > 100  # random 10% split by default
    assert a["split"]["kind"] == "random"


def test_blocks_keep_line_numbers(tmp_path):
    lines = random_lines(500, seed=2)
    path = write_lines(tmp_path / "t.txt", lines)
    blocks = list(tsv.iter_blocks(str(path), block_bytes=3000))
    assert len(blocks) > 10 and sum(b.lines for b in blocks) == 500
    assert [b.first_line for b in blocks] == list(np.cumsum([1] + [b.lines for b in blocks[:-1]]))
    parsed = [tsv.parse_block(b) for b in blocks]
    assert np.concatenate([p.lines for p in parsed]).tolist() == list(range(1, 501))


def test_min_frequency_vocabulary(tmp_path):
    common, rare = "0000abcd", "ffff0001"
    lines = [criteo_line(i % 2, cats=[common] * 26) for i in range(5)] + [criteo_line(0, cats=[rare] + [""] * 25)]
    src = write_lines(tmp_path / "t.txt", lines)
    s = prepare_criteo([src], tmp_path / "out", min_frequency=2, test_fraction=0.0, progress=False)
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    c1 = m["columns"]["C1"]
    assert c1["vocab_size"] == 2 and c1["encoding"] == "vocab" and c1["min_frequency"] == 2
    assert json.loads((tmp_path / "out" / c1["vocab_file"]).read_text()) == [None, common]
    assert read_split(tmp_path / "out", "train").column("C1").to_pylist() == [1] * 5 + [0]  # rare -> OOV 0
    assert s["vocab_sizes"]["C2"] == 2


def test_days_split_and_halving(tmp_path):
    for d, n in ((0, 30), (1, 20), (2, 10)):
        write_lines(tmp_path / f"day_{d}", [criteo_line(d % 2, [str(d)] + [""] * 12) for _ in range(n)])
    days = [tmp_path / f"day_{d}" for d in range(3)]
    s = prepare_criteo(days, tmp_path / "out", hash_buckets=100, progress=False)
    assert s["rows"] == {"train": 50, "test": 10}
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["split"]["kind"] == "days" and m["split"]["test_day"] == 2
    assert read_split(tmp_path / "out", "test").column("I1").to_pylist() == [pytest.approx(np.log1p(2))] * 10
    s = prepare_criteo(days, tmp_path / "halves", hash_buckets=100, halve_test_day=True, progress=False)
    assert s["rows"] == {"train": 50, "valid": 5, "test": 5}
    s = prepare_criteo(days[:2], tmp_path / "d1", hash_buckets=100, test_day=1, progress=False)
    assert s["rows"] == {"train": 30, "test": 20}
    with pytest.raises(DataError, match="day 2 comes after the test day 1"):
        prepare_criteo(days, tmp_path / "d2", hash_buckets=100, test_day=1, progress=False)
    assert not (tmp_path / "d2").exists()


def test_cli_prepare_prints_summary(tmp_path, capsys):
    src = write_lines(tmp_path / "t.txt", random_lines(100))
    rc = cli_main(["data", "prepare", "criteo", "--input", str(src), "--out", str(tmp_path / "out"),
                   "--hash-buckets", "64", "--no-progress", "--test-fraction", "0.2", "--valid-fraction", "0.1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rows: train" in out and "bad lines: 0" in out and "positive rate" in out and "C26=64" in out
    assert json.loads((tmp_path / "out/manifest.json").read_text())["splits"].keys() == {"train", "valid", "test"}


@pytest.mark.parametrize("backend", ["torch", "torchrec"])
def test_criteo_config_trains_on_prepared_data(tmp_path, backend, capsys):
    """The shipped config as it is (FTRL wide part, AdaGrad deep part), with either backend."""
    if backend == "torchrec" and not torchrec_available():
        pytest.skip("torchrec not installed")
    cfg = load_config(ROOT / "configs/criteo.yaml")
    assert [c for c, v in cfg.features.columns.items() if v.kind == "dense"] == DENSE
    assert len(cfg.model.deep.embeddings) == 26 and cfg.features.crosses
    src = write_lines(tmp_path / "t.txt", random_lines(1500))
    prepare_criteo([src], tmp_path / "data", hash_buckets=256, progress=False, row_group_rows=256)
    capsys.readouterr()
    rc = cli_main(["train", "--config", str(ROOT / "configs/criteo.yaml"), f"data.path={tmp_path / 'data'}",
                   f"run.out_dir={tmp_path / 'runs'}", "train.epochs=1", "train.progress=false", "data.num_workers=0",
                   "data.batch_size=256", f"model.embedding_backend={backend}", "run.device=cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert "test AUC" in out.out
