"""`wdl data import`: Parquet and CSV in, a wdl data set out (vocabularies, statistics, splits,
unknown counts), bad input as one-line errors, and an imported set that trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from wdl.cli import main
from wdl.data.manifest import load_manifest

from helpers import write_shop_config


def raw_table(rows: int = 2000, seed: int = 0) -> pa.Table:
    """A shop's click log: integer users from 0, string items with nulls, string tag lists (one
    null list), a skewed price with nulls, a time and a 0/1 label that depends on user and item."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 40, rows)
    item = rng.integers(0, 25, rows)
    items = np.array([f"sku-{i}" for i in item], dtype=object)
    items[::101] = None
    tags = [[f"t{j}" for j in rng.integers(0, 6, rng.integers(0, 3))] for _ in range(rows)]
    tags[3] = None
    price = rng.lognormal(3, 1, rows)
    logit = (user % 4 - 1.5) + (item % 3 - 1.0)
    return pa.table({
        "user": pa.array(user, pa.int64()),
        "item": pa.array(items, pa.string()),
        "tags": pa.array(tags, pa.list_(pa.string())),
        "price": pa.array(price, mask=np.arange(rows) % 40 == 0),
        "ts": pa.array(np.arange(rows, dtype=np.int64) * 60),
        "clicked": pa.array((rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)),
    })


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    t = raw_table()
    pq.write_table(t.slice(0, 1200), d / "a.parquet", row_group_size=500)
    pq.write_table(t.slice(1200), d / "b.parquet", row_group_size=500)
    return d


SPEC = """\
label: clicked
columns:
  user: {kind: categorical}
  item: {kind: categorical, min_frequency: 2}
  tags: {kind: multi_hot, top_k: 4}
  price: {kind: dense}
split: {kind: random, seed: 3, test_fraction: 0.2, valid_fraction: 0.1}
"""


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["data", "import", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def imported(raw_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "shop"
    spec = out.parent / "columns.yaml"
    spec.write_text(SPEC)
    assert main(["data", "import", str(raw_dir), "--spec", str(spec), "--out", str(out), "--no-progress"]) == 0
    return out


def test_parquet_import_vocabularies_and_splits(imported, raw_dir):
    m = load_manifest(imported)
    raw = pa.concat_tables([pq.read_table(raw_dir / "a.parquet"), pq.read_table(raw_dir / "b.parquet")])
    assert m.label == "clicked" and set(m.splits) == {"train", "valid", "test"}
    assert sum(s.rows for s in m.splits.values()) == raw.num_rows
    assert 0.6 < m.splits["train"].rows / raw.num_rows < 0.8
    # A raw user 0 is a value like any other: it has its own id, never the reserved id 0.
    users = json.loads((imported / "vocab/user.json").read_text())
    assert users[0] is None and 0 in users and m.columns["user"]["vocab_size"] == len(users) == 41
    tags = json.loads((imported / "vocab/tags.json").read_text())
    assert len(tags) == 5 and m.columns["tags"]["vocab_size"] == 5  # top_k 4 plus id 0
    train = pq.read_table([imported / f.path.relative_to(imported) for f in m.splits["train"].files])
    assert train.schema.field("user").type == pa.int64() and pa.types.is_list(train.schema.field("tags").type)
    assert train.schema.field("price").type == pa.float32() and train.schema.field("clicked").type == pa.int8()
    assert min(train.column("user").to_pylist()) >= 1  # every train user is in the vocabulary
    assert "ts" not in train.column_names  # only the label and the spec's columns are written
    dense = m.columns["price"]
    assert dense["std"] > 0 and len(dense["bucket_edges"]) == 19 and dense["missing_train"] > 0
    assert dense["bucket_edges"] == sorted(dense["bucket_edges"]) and dense["min"] > 0
    unknown = m.raw["unknown_values"]
    assert unknown["train"]["item"]["null"] > 0 and unknown["train"]["item"]["unknown"] >= unknown["train"]["item"]["null"]
    assert unknown["train"]["user"] == {"values": m.splits["train"].rows, "unknown": 0, "null": 0}
    assert sum(unknown[s]["tags"]["null"] for s in unknown) == 1  # the one null list, written as []
    for split in m.splits.values():  # counted as written: the rate of the labels in the files
        labels = pq.read_table([imported / f.path.relative_to(imported) for f in split.files]).column("clicked")
        assert split.positive_rate == sum(labels.to_pylist()) / split.rows


def test_ids_decode_back_to_raw_values(imported, raw_dir):
    """Every train row's ids, looked up in the vocabulary files, give its raw values back."""
    raw = pa.concat_tables([pq.read_table(raw_dir / "a.parquet"), pq.read_table(raw_dir / "b.parquet")])
    train = pq.read_table(imported / "train")
    vocab = {c: json.loads((imported / f"vocab/{c}.json").read_text()) for c in ("user", "item", "tags")}
    raw_users = sorted(raw.column("user").to_pylist())
    users = sorted(vocab["user"][i] for i in train.column("user").to_pylist())
    assert set(users) <= set(raw_users)
    items = [vocab["item"][i] for i in train.column("item").to_pylist()]
    assert sum(x is None for x in items) == load_manifest(imported).raw["unknown_values"]["train"]["item"]["unknown"]
    assert all(vocab["tags"][i] in {None, *[f"t{j}" for j in range(6)]} for row in train.column("tags").to_pylist() for i in row)


def test_same_rows_same_split_whatever_the_workers(imported, raw_dir, tmp_path):
    spec = tmp_path / "columns.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "w2"
    assert main(["data", "import", str(raw_dir / "*.parquet"), "--spec", str(spec), "--out", str(out),
                 "--workers", "2", "--no-progress"]) == 0
    for split in ("train", "valid", "test"):
        a = pq.read_table(imported / split)
        b = pq.read_table(out / split)
        assert a.equals(b)


def test_pass_two_reads_kept_tables_or_the_input_alike(imported, raw_dir, tmp_path, monkeypatch):
    """Pass 1 keeps the tables it read for pass 2 within a memory budget; with none kept, pass 2
    reads the input again and writes the same files. Nothing of the hand-over stays behind."""
    from wdl.ingest import importer

    assert sorted(p.name for p in imported.iterdir()) == ["manifest.json", "test", "train", "train-config.yaml", "valid", "vocab"]
    monkeypatch.setattr(importer, "KEPT_SHARE", 0)
    spec = tmp_path / "columns.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "reread"
    assert main(["data", "import", str(raw_dir), "--spec", str(spec), "--out", str(out), "--no-progress"]) == 0
    for split in ("train", "valid", "test"):
        for a, b in zip(sorted((imported / split).iterdir()), sorted((out / split).iterdir()), strict=True):
            assert a.read_bytes() == b.read_bytes()


def test_csv_inferred_with_time_split_and_min_frequency(raw_dir, tmp_path, capsys):
    t = raw_table(seed=1)
    csv = tmp_path / "log.csv"
    tags = [None if x is None else "|".join(x) for x in t.column("tags").to_pylist()]
    pacsv.write_csv(t.set_column(2, "tags", pa.array(tags, pa.string())), csv)
    rc, out, err = run(capsys, csv, "--label", "clicked", "--kind", "tags=multi_hot",
                       "--min-frequency", "100", "--split", "time", "--time-column", "ts",
                       "--valid-from", 60 * 1500, "--test-from", 60 * 1800, "--out", tmp_path / "ds")
    assert rc == 0, err
    assert "user: {kind: categorical, min_frequency: 100}" in out  # the inferred spec, printed as YAML
    assert "price: {kind: dense, normalize: log1p, buckets: auto}" in out  # skewed and positive
    assert "vocab_size: auto" in out and "unknown or missing" in out
    m = load_manifest(tmp_path / "ds")
    assert {k: s.rows for k, s in m.splits.items()} == {"train": 1500, "valid": 300, "test": 200}
    assert m.columns["tags"]["kind"] == "multi_hot" and m.raw["split"]["kind"] == "time"
    # min_frequency 100: with 40 users over 1500 rows (~37 each) no user survives; all unknown.
    assert m.columns["user"]["vocab_size"] == 1
    assert m.raw["unknown_values"]["test"]["user"]["unknown"] == 200


def test_files_split_and_refusing_to_overwrite(raw_dir, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC.split("split:")[0] + f"split: {{kind: files, files: {{train: [{raw_dir / 'a.parquet'}], "
                                               f"test: [{raw_dir / 'b.parquet'}]}}}}\n")
    rc, out, err = run(capsys, "--spec", spec, "--out", tmp_path / "ds")
    assert rc == 0, err
    m = load_manifest(tmp_path / "ds")
    assert m.splits["train"].rows == 1200 and m.splits["test"].rows == 800
    rc, out, err = run(capsys, "--spec", spec, "--out", tmp_path / "ds")
    assert rc == 2 and "--overwrite" in err


@pytest.mark.parametrize("case, message", [
    ("missing", "column 'nope' named in the spec is missing"),
    ("dense_string", "column 'item' is string but dense needs numbers"),
    ("label", "labels must be 0/1"),
    ("glob", "matches no files"),
    ("empty", "no rows"),
    ("bad_csv", "cannot read"),
    ("label_words", "column 'clicked' is string but label needs 0/1 numbers or booleans"),
    ("seed", "split.seed: the seed must be an integer in [0, 2^63), got -1"),
    ("top_k", "--top-k must be an integer >= 1, got 0"),
    ("twice", "column 'user' appears 2 times"),
    ("stray_flag", "--test-from does not apply to a random split"),
    ("empty_valid", "valid_from 5 is not before test_from 3: the valid split would be empty"),
])
def test_bad_input_is_one_line_exit_2(raw_dir, tmp_path, capsys, case, message):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    inputs = [raw_dir]
    if case == "missing":
        spec.write_text(SPEC.replace("price: {kind: dense}", "nope: {kind: dense}"))
    elif case == "dense_string":
        spec.write_text(SPEC.replace("item: {kind: categorical, min_frequency: 2}", "item: {kind: dense}"))
    elif case == "label":
        pq.write_table(raw_table(50).set_column(5, "clicked", pa.array([2] * 50, pa.int8())), tmp_path / "x.parquet")
        inputs = [tmp_path / "x.parquet"]
    elif case == "glob":
        inputs = [tmp_path / "nothing-*.parquet"]
    elif case == "empty":
        pq.write_table(raw_table(10).slice(0, 0), tmp_path / "e.parquet")
        inputs = [tmp_path / "e.parquet"]
    elif case == "label_words":
        words = pa.array(["yes", "no"] * 25)
        pq.write_table(raw_table(50).set_column(5, "clicked", words), tmp_path / "w.parquet")
        inputs, spec = [tmp_path / "w.parquet"], None
    elif case == "bad_csv":
        (tmp_path / "bad.csv").write_text('user,clicked\n1,0\n2,1,3,4\n"unterminated\n')
        inputs, spec = [tmp_path / "bad.csv"], None
    args = [*inputs, "--out", tmp_path / "ds"] + (["--spec", spec] if spec else ["--label", "clicked"])
    if case == "seed":
        args += ["--seed", "-1"]
    elif case == "top_k":
        args = [*inputs, "--out", tmp_path / "ds", "--label", "clicked", "--top-k", "0"]
    elif case == "stray_flag":
        args = [*inputs, "--out", tmp_path / "ds", "--label", "clicked", "--test-from", "2024-04-01"]
    elif case == "empty_valid":
        args = [*inputs, "--out", tmp_path / "ds", "--label", "clicked", "--split", "time", "--time-column", "user",
                "--valid-from", "5", "--test-from", "3"]
    elif case == "twice":
        (tmp_path / "twice.csv").write_text("user,user,clicked\n1,2,0\n3,4,1\n")
        args = [tmp_path / "twice.csv", "--out", tmp_path / "ds", "--label", "clicked"]
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob("ds.tmp-*"))


def test_imported_set_trains_one_epoch(imported, tmp_path, capsys):
    cfg = write_shop_config(tmp_path / "import.yaml", imported, tmp_path / "runs", "imported")
    assert main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err
    recs = [json.loads(x) for x in (tmp_path / "runs/imported/metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and np.isfinite(recs[0]["train_loss"]) and 0 <= recs[0]["auc"] <= 1


def test_csv_boolean_categorical(tmp_path, capsys):
    csv = tmp_path / "flags.csv"
    pacsv.write_csv(pa.table({"flag": [True, False, None, True] * 50, "clicked": [0, 1] * 100}), csv)
    rc, out, err = run(capsys, csv, "--label", "clicked", "--out", tmp_path / "ds")
    assert rc == 0, err
    assert json.loads((tmp_path / "ds" / "vocab" / "flag.json").read_text()) == [None, 1, 0]  # as int64 ids, most frequent first


def test_integers_beyond_float64s_exact_range_import_as_dense(tmp_path, capsys):
    """An event time in nanoseconds (~1.7e18) is an inferred dense column: it is rounded to the
    float32 it is stored as, not refused by a cast that wants every integer exact."""
    t = raw_table(2000)  # more than 1000 distinct values: inferred dense
    t = t.append_column("event_ns", pa.array(1_700_000_000_000_000_000 + np.arange(2000) * 1_000_003, pa.int64()))
    pq.write_table(t, tmp_path / "ns.parquet")
    rc, out, err = run(capsys, tmp_path / "ns.parquet", "--label", "clicked", "--out", tmp_path / "ds")
    assert rc == 0, err
    assert load_manifest(tmp_path / "ds").columns["event_ns"]["kind"] == "dense"


def test_each_input_file_is_read_once(tmp_path, capsys):
    """A file named twice (a.parquet and ./a.parquet), or an earlier import's output inside the
    scanned folder, adds no rows; a file in two splits of a files split is refused."""
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(raw_table(1000), raw / "a.parquet")
    (raw / "README.txt.gz").write_bytes(b"")  # not a CSV file: only .csv.gz is
    rc, out, err = run(capsys, raw, "--label", "clicked", "--out", raw / "ds")
    assert rc == 0, err
    once = load_manifest(raw / "ds")
    rc, out, err = run(capsys, raw, "--label", "clicked", "--out", raw / "ds", "--overwrite")  # ds is inside raw now
    assert rc == 0, err
    again = load_manifest(raw / "ds")
    assert {k: v.rows for k, v in again.splits.items()} == {k: v.rows for k, v in once.splits.items()}
    rc, out, err = run(capsys, raw / "a.parquet", f"{raw}/./a.parquet", "--label", "clicked", "--out", tmp_path / "twice")
    assert rc == 0, err
    assert sum(v.rows for v in load_manifest(tmp_path / "twice").splits.values()) == 1000
    rc, out, err = run(capsys, "--label", "clicked", "--out", tmp_path / "both", "--train-files", str(raw / "a.parquet"),
                       "--test-files", f"{raw}/./a.parquet")
    assert rc == 2 and "is in both the train and the test files" in err


def test_column_names_that_are_no_file_names_get_vocabularies(tmp_path, capsys):
    """CSV headers such as "user id" or "Größe": their vocabulary files get names of their own
    (recorded in the manifest), and the import decodes back to the raw values."""
    rows = ["user id,Größe,clicked"] + [f"{i % 7},{'abc'[i % 3]},{i % 2}" for i in range(60)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    rc, out, err = run(capsys, tmp_path / "a.csv", "--label", "clicked", "--out", tmp_path / "ds",
                       "--kind", "user id=categorical")
    assert rc == 0, err
    m = load_manifest(tmp_path / "ds")
    files = {c: m.columns[c]["vocab_file"] for c in ("user id", "Größe")}
    assert len(set(files.values())) == 2 and all((tmp_path / "ds" / f).is_file() for f in files.values())
    vocab = json.loads((tmp_path / "ds" / files["Größe"]).read_text(encoding="utf-8"))
    assert vocab[0] is None and sorted(vocab[1:]) == ["a", "b", "c"]
