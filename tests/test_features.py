import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from wdl.config import ColumnConfig, CrossConfig, FeaturesConfig
from wdl.data.batch import FeatureTable
from wdl.data.features import FeatureSpec
from wdl.data.hashing import cross_ids, hash_ids, hash_strings
from wdl.errors import DataError


def spec(columns, crosses=None, sparse=(), dense=(), meta=None, root=None):
    cfg = FeaturesConfig(label="label", columns=columns, crosses=crosses or {})
    return FeatureSpec(cfg, meta or {}, list(sparse), list(dense), root=root)


def test_hashing_is_stable_and_in_range():
    x = np.arange(-5, 1000, dtype=np.int64)
    a, b = hash_ids(x, 97), hash_ids(x.copy(), 97)
    assert (a == b).all() and a.min() >= 0 and a.max() < 97
    # roughly uniform: no bucket holds more than 3x its share
    assert np.bincount(a, minlength=97).max() < 3 * len(x) / 97
    # pinned values: hashes are part of the data format (trained tables index by them), so a
    # change must be deliberate
    assert hash_ids(np.array([0, 1, 2]), 1 << 20).tolist() == [904623, 154817, 480974]
    assert hash_strings(pa.array(["a", "b"]), 1 << 20).tolist() == [981056, 160388]
    assert cross_ids([np.array([1]), np.array([2])], 1 << 20, 7).tolist() == [1028982]
    s = hash_strings(pa.array(["a", "b", "a", None]), 1000)
    assert s[0] == s[2] and s[0] != s[1]


def test_cross_depends_on_every_component_and_order():
    a, b = np.array([1, 1, 2]), np.array([5, 6, 5])
    c = cross_ids([a, b], 10_000, salt=1)
    assert c[0] != c[1] and c[0] != c[2]
    assert (c == cross_ids([a.copy(), b.copy()], 10_000, salt=1)).all()
    assert not (c == cross_ids([b, a], 10_000, salt=1)).all()


def test_multi_hot_crossed_with_scalar_gives_one_id_per_element():
    s = spec({"g": ColumnConfig(kind="categorical", vocab_size=3),
              "genres": ColumnConfig(kind="multi_hot", vocab_size=10)},
             {"gx": CrossConfig(columns=["g", "genres"], hash_buckets=1000)}, sparse=["gx", "genres"])
    t = pa.table({"label": pa.array([1, 0, 1], pa.int8()), "g": [1, 2, 1],
                  "genres": pa.array([[3, 4], [], [4]], pa.list_(pa.int64()))})
    ft = s.encode(t, "t")
    gx = ft.sparse["gx"]
    assert gx.lengths.tolist() == [2, 0, 1]
    # row 0's second element and row 2's only element are both (g=1, genre=4)
    assert gx.values[1] == gx.values[2] and gx.values[0] != gx.values[1]
    assert ft.sparse["genres"].values.tolist() == [3, 4, 4]


def test_vocab_size_maps_out_of_range_and_null_to_reserved_zero():
    s = spec({"u": ColumnConfig(kind="categorical", vocab_size=5)}, sparse=["u"])
    t = pa.table({"label": pa.array([0, 1, 0, 1], pa.int8()), "u": pa.array([1, 7, None, -3], pa.int64())})
    assert s.encode(t, "t").sparse["u"].values.tolist() == [1, 0, 0, 0]


def test_vocab_file_lookup(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps([None, "x", "y"]))
    s = spec({"c": ColumnConfig(kind="categorical", vocab_file="v.json")}, sparse=["c"], root=tmp_path)
    t = pa.table({"label": pa.array([0, 1, 1], pa.int8()), "c": ["y", "zzz", "x"]})
    assert s.encode(t, "t").sparse["c"].values.tolist() == [2, 0, 1]
    assert s.num_embeddings("c") == 3


@pytest.mark.parametrize("rows", [1, 7, 5000])
def test_vocab_file_lookup_equals_arrow_set_lookup_at_any_batch_size(tmp_path, rows):
    """A vocabulary look-up is built once and reused (a dict for a few values, Arrow for many,
    a table for integers): ids, unknown and missing counts as Arrow's index_in gives them, for
    strings, integers read as strings, lists, nulls; and the same after a pickle (a loader worker)."""
    import pickle

    import pyarrow.compute as pc

    rng = np.random.default_rng(rows)
    words = [f"w{i}" for i in range(3000)]
    (tmp_path / "s.json").write_text(json.dumps([None, *words]))
    (tmp_path / "i.json").write_text(json.dumps([None, *range(100, 4100)]))
    s = spec({"c": ColumnConfig(kind="categorical", vocab_file="s.json"),
              "n": ColumnConfig(kind="categorical", vocab_file="i.json"),
              "m": ColumnConfig(kind="multi_hot", vocab_file="s.json")}, sparse=["c", "n", "m"], root=tmp_path)
    pick = lambda n: [None if r < 0.05 else f"w{k}" for r, k in zip(rng.random(n), rng.integers(0, 3500, n))]  # noqa: E731
    t = pa.table({"label": pa.array(np.zeros(rows, np.int8)), "c": pick(rows),
                  "n": pa.array([str(k) for k in rng.integers(0, 4200, rows)]),  # integer ids given as strings
                  "m": [pick(k) for k in rng.integers(0, 4, rows)]})

    def expected(col, vocab):
        flat = pc.list_flatten(col) if pa.types.is_list(col.type) else col
        if pa.types.is_null(flat.type):  # nulls only (a row of [None]): nothing to look up
            return [0] * len(flat)
        return pc.fill_null(pc.add(pc.index_in(flat, value_set=vocab.cast(flat.type)), 1), 0).to_numpy().tolist()

    for enc in (s, pickle.loads(pickle.dumps(s))):
        got = enc.encode(t, "t")
        assert got.sparse["c"].values.tolist() == expected(t["c"].combine_chunks(), pa.array(words))
        assert got.sparse["n"].values.tolist() == expected(t["n"].combine_chunks(), pa.array(range(100, 4100)))
        assert got.sparse["m"].values.tolist() == expected(t["m"].combine_chunks(), pa.array(words))
    counts = s.take_unknown_counts()["c"]
    c = t["c"].combine_chunks()
    assert counts["missing"] == c.null_count
    assert counts["out_of_vocab"] == sum(v is not None and int(v[1:]) >= 3000 for v in c.to_pylist())


def test_dense_normalisation_and_bad_values():
    s = spec({"d": ColumnConfig(kind="dense", normalize="standard", fill=10.0)}, dense=["d"],
             meta={"d": {"mean": 10.0, "std": 2.0}})
    t = pa.table({"label": pa.array([0, 1, 1], pa.int8()), "d": pa.array([12.0, None, 8.0])})
    assert s.encode(t, "t").dense[:, 0].tolist() == [1.0, 0.0, -1.0]
    for poison in (float("inf"), float("nan")):  # NaN is bad data; a null is a missing value
        bad = pa.table({"label": pa.array([0, 1], pa.int8()), "d": pa.array([1.0, poison])})
        with pytest.raises(DataError, match=r"dense column 'd'.*row 1"):
            s.encode(bad, "file.parquet")


@pytest.mark.parametrize("labels", [[0, 2], [0.0, float("nan")], [1, None]])
def test_labels_must_be_zero_or_one(labels):
    s = spec({"u": ColumnConfig(kind="categorical", vocab_size=5)}, sparse=["u"])
    t = pa.table({"label": pa.array(labels), "u": pa.array([1, 2], pa.int64())})
    with pytest.raises(DataError, match="label"):
        s.encode(t, "f.parquet")


def test_missing_column_is_named():
    s = spec({"u": ColumnConfig(kind="categorical", vocab_size=5)}, sparse=["u"])
    with pytest.raises(DataError, match=r"column 'u' named in the config is missing"):
        s.check_schema(pa.schema([("label", pa.int8())]), "f.parquet")


def test_take_gathers_jagged_rows():
    s = spec({"m": ColumnConfig(kind="multi_hot", vocab_size=10)}, sparse=["m"])
    t = pa.table({"label": pa.array([0, 1, 0, 1], pa.int8()),
                  "m": pa.array([[1], [2, 3], [], [4, 5, 6]], pa.list_(pa.int64()))})
    b = s.encode(t, "t").take(torch.tensor([3, 0, 2, 1]))
    assert b.sparse["m"].lengths.tolist() == [3, 1, 0, 2]
    assert b.sparse["m"].values.tolist() == [4, 5, 6, 1, 2, 3]
    assert b.labels.tolist() == [1, 0, 0, 1]


def test_a_table_held_on_a_gpu_cuts_the_same_batches_from_host_lengths():
    """A table on a GPU keeps host copies of its lengths (FeatureTable.to) so that cutting a
    batch never waits for the device; emulated here on the CPU: same batches, padded or not."""
    s = spec({"m": ColumnConfig(kind="multi_hot", vocab_size=10), "c": ColumnConfig(kind="categorical", vocab_size=5)},
             crosses={"mc": CrossConfig(columns=["m", "c"], hash_buckets=50)}, sparse=["m", "c", "mc"])
    g = torch.Generator().manual_seed(0)
    lists = [torch.randint(1, 10, (int(n),), generator=g).tolist() for n in torch.randint(0, 5, (64,), generator=g)]
    t = s.encode(pa.table({"label": pa.array([i % 2 for i in range(64)], pa.int8()),
                           "m": pa.array(lists, pa.list_(pa.int64())),
                           "c": pa.array([i % 5 for i in range(64)], pa.int64())}), "t")
    held = FeatureTable(t.dense, t.labels, t.ids, t.single_keys, t.multi, t.order,
                        host_lengths=[t.multi["m"].lengths.clone()])
    for pad in (False, True):
        if pad:
            t.pad_batches(16)
            held.pad_batches(16)
        for _ in range(4):
            idx = torch.randperm(64, generator=g)[:16]
            a, b = t.take(idx), held.take(idx, idx.clone())
            assert b.sparse["m"].padded == pad
            for k in ("m", "c", "mc"):
                assert torch.equal(a.sparse[k].values, b.sparse[k].values)
                assert torch.equal(a.sparse[k].lengths, b.sparse[k].lengths)


def test_a_dense_column_in_buckets_is_a_categorical_id_for_the_wide_part_and_crosses():
    cols = {"price": ColumnConfig(kind="dense", normalize="none", buckets=[1.0, 10.0, 100.0]),
            "g": ColumnConfig(kind="categorical", vocab_size=3)}
    s = spec(cols, {"g_price": CrossConfig(columns=["g", "price"], hash_buckets=50)},
             sparse=["price", "g_price"], dense=["price"], meta={"price": {"mean": 0.0, "std": 1.0}})
    assert s.num_embeddings("price") == 5 and s.columns == ["label", "price", "g"]  # read once for both uses
    t = pa.table({"label": pa.array([0, 1, 0, 1, 0], pa.int8()), "g": pa.array([1, 1, 2, 2, 1]),
                  "price": pa.array([0.5, 1.0, 50.0, 1e6, None], pa.float64())})
    table = s.encode(t, "t")
    assert table.sparse["price"].values.tolist() == [1, 2, 3, 4, 0]  # edges are lower bounds; null -> 0
    assert table.dense[:, 0].tolist() == [0.5, 1.0, 50.0, 1e6, 0.0]  # the dense value is still there
    crosses = table.sparse["g_price"].values.tolist()
    assert crosses[0] != crosses[1] and len(set(crosses)) == 5
    with pytest.raises(DataError, match="'price' holds nan"):
        s.encode(t.set_column(2, "price", pa.array([float("nan")] * 5)), "t")


def test_bucket_edges_from_the_manifest_and_config_errors():
    from wdl.config import load_config
    from wdl.errors import ConfigError

    s = spec({"price": ColumnConfig(kind="dense", buckets="auto")}, sparse=["price"],
             meta={"price": {"bucket_edges": [2.0, 2.0, 5.0]}})
    assert s.num_embeddings("price") == 4 and s.sparse["price"].edges.tolist() == [2.0, 5.0]
    with pytest.raises(ConfigError, match="no bucket_edges"):
        spec({"price": ColumnConfig(kind="dense", buckets="auto")}, sparse=["price"], meta={"price": {}})
    base = "configs/movielens-100k.yaml"
    with pytest.raises(ConfigError, match="strictly ascending"):
        load_config(base, ["features.columns.release_year.buckets=[1990, 1980]"])
    with pytest.raises(ConfigError, match="only dense columns are bucketed"):
        load_config(base, ["features.columns.gender.buckets=[1, 2]"])
    with pytest.raises(ConfigError, match="is not a sparse column or cross"):
        load_config(base, ["model.wide.features=[release_year]"])
    cfg = load_config(base, ["features.columns.release_year.buckets=[1970, 1990]", "model.wide.features=[release_year]"])
    assert cfg.features.columns["release_year"].buckets == [1970.0, 1990.0]
