"""The loaders: every row exactly once per epoch, deterministic per seed, resumable."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from wdl.config import ColumnConfig, FeaturesConfig, load_config
from wdl.data.dataset import feature_spec, load_table
from wdl.data.features import FeatureSpec
from wdl.data.manifest import load_manifest
from wdl.data.parquet import InMemoryLoader, StreamingLoader, part_sizes
from wdl.errors import DataError


@pytest.fixture
def spec_and_files(tiny_config, tiny_data):
    cfg = load_config(tiny_config)
    manifest = load_manifest(tiny_data)
    return feature_spec(cfg, manifest), [f.path for f in manifest.split("train").files]


def row_keys(batch):
    # (user, movie, year) identifies a row of the tiny set well enough; count multiplicities.
    return list(zip(batch.sparse["user_id"].values.tolist(), batch.sparse["movie_id"].values.tolist(),
                    batch.dense[:, 0].tolist(), batch.labels.tolist()))


def all_rows(spec, files):
    return Counter(row_keys(load_table(files, spec).as_batch()))


def test_part_sizes_equal_steps_and_no_row_lost():
    for total, parts, bs in [(2400, 2, 128), (2401, 2, 128), (1000, 3, 7), (10, 4, 3)]:
        sizes, steps = part_sizes(total, parts, bs)
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
        assert steps == -(-min(sizes) // bs)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_streaming_reads_every_row_once_per_epoch(spec_and_files, world, workers):
    spec, files = spec_and_files
    expected = all_rows(spec, files)
    seen, steps = Counter(), set()
    for rank in range(world):
        loader = StreamingLoader(files, spec, 100, rank=rank, world_size=world, num_workers=workers,
                                 shuffle_buffer=300, seed=3)
        loader.set_epoch(1)
        n = 0
        for b in loader:
            seen.update(row_keys(b))
            n += 1
        assert n == loader.steps_per_epoch
        steps.add(n)
    assert seen == expected
    assert len(steps) == 1  # every rank runs the same number of steps


def test_streaming_order_is_deterministic_per_seed_and_epoch(spec_and_files):
    spec, files = spec_and_files

    def order(seed, epoch):
        loader = StreamingLoader(files, spec, 128, shuffle_buffer=512, seed=seed)
        loader.set_epoch(epoch)
        return [row_keys(b) for b in loader]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_mid_epoch_continues_exactly(spec_and_files, workers):
    spec, files = spec_and_files
    full = StreamingLoader(files, spec, 100, num_workers=workers, shuffle_buffer=300, seed=5)
    full.set_epoch(2)
    reference = [row_keys(b) for b in full]
    first = StreamingLoader(files, spec, 100, num_workers=workers, shuffle_buffer=300, seed=5)
    first.set_epoch(2)
    it = iter(first)
    head = [row_keys(next(it)) for _ in range(7)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_done": 7}
    resumed = StreamingLoader(files, spec, 100, num_workers=workers, shuffle_buffer=300, seed=5)
    resumed.load_state_dict(state)
    tail = [row_keys(b) for b in resumed]
    assert head + tail == reference


def test_in_memory_loader_partitions_and_resumes(spec_and_files):
    spec, files = spec_and_files
    table = load_table(files, spec)
    seen = Counter()
    for rank in range(2):
        loader = InMemoryLoader(table, 128, rank=rank, world_size=2, seed=1)
        loader.set_epoch(0)
        for b in loader:
            seen.update(row_keys(b))
    assert seen == Counter(row_keys(table.as_batch()))
    a = InMemoryLoader(table, 128, seed=1)
    ref = [row_keys(b) for b in a]
    b = InMemoryLoader(table, 128, seed=1)
    b.load_state_dict({"epoch": 0, "batches_done": 5})
    assert [row_keys(x) for x in b] == ref[5:]


def test_more_ranks_than_row_groups_is_a_clear_error(spec_and_files):
    spec, files = spec_and_files
    with pytest.raises(DataError, match="row groups cannot feed 64 ranks"):
        StreamingLoader(files, spec, 10, world_size=64)


def test_unreadable_parquet_is_named(spec_and_files, tmp_path):
    spec, _ = spec_and_files
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        StreamingLoader([bad], spec, 10)


def test_batches_are_tensors(spec_and_files):
    spec, files = spec_and_files
    b = next(iter(StreamingLoader(files, spec, 64, shuffle=False)))
    assert b.dense.dtype == torch.float32 and b.labels.dtype == torch.float32
    assert b.sparse["genres"].values.dtype == torch.int64 and len(b) == 64


@pytest.mark.parametrize("shuffle", [True, False])  # cut by a gather, or sliced (eval, predict)
def test_moving_a_batch_copies_each_shared_tensor_once(spec_and_files, shuffle):
    """Batch.map (to / pin_memory / a CUDA graph's static copy): the single-id keys' columns
    move as one ids matrix and shared lengths once, and still share memory afterwards."""
    spec, files = spec_and_files
    b = next(iter(StreamingLoader(files, spec, 64, shuffle=shuffle, seed=1)))
    calls = []
    moved = b.map(lambda t: calls.append(t) or t.clone())
    distinct = {t.data_ptr() for t in calls}
    assert len(calls) == len(distinct) == len(b.tensors())
    # dense, labels, ids, the single keys' lengths, genres' values and the lengths it shares
    # with its cross, the cross's values
    assert len(calls) == 7
    singles = [k for k, v in moved.sparse.items() if v.single]
    assert singles and set(singles) == set(moved.id_keys)
    for k, v in b.sparse.items():
        assert torch.equal(moved.sparse[k].values, v.values) and torch.equal(moved.sparse[k].lengths, v.lengths)
    moved.ids.add_(1)  # the single keys' values are views of the moved matrix
    assert all(torch.equal(moved.sparse[k].values, b.sparse[k].values + 1) for k in singles)
    assert moved.sparse["genres"].lengths is moved.sparse["gender_genres"].lengths


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_shapes_when_streaming(spec_and_files, workers):
    """fix_shapes: every full streamed batch pads its multi-valued columns to one capacity,
    the same in every block and worker; the rows are those of the unpadded stream."""
    spec, files = spec_and_files
    plain = StreamingLoader(files, spec, 100, num_workers=workers, shuffle_buffer=300, seed=5)
    fixed = StreamingLoader(files, spec, 100, num_workers=workers, shuffle_buffer=300, seed=5)
    fixed.fix_shapes()
    sizes = set()
    for a, b in zip(plain, fixed):
        assert row_keys(a) == row_keys(b)
        g = b.sparse["genres"]
        if len(b) == 100:
            assert g.padded and torch.equal(g.lengths[:-1], a.sparse["genres"].lengths)
            n = int(a.sparse["genres"].lengths.sum())
            assert torch.equal(g.values[:n], a.sparse["genres"].values)
            sizes.add(g.values.numel())
    assert len(sizes) == 1 and sizes == {fixed.capacity[0]}


def test_a_worker_hands_over_a_batch_as_one_shared_buffer(spec_and_files):
    """Batch.pack (what a loader worker sends): every tensor in one shared-memory buffer, so the
    hand-over is one segment; unpacked, the batch is whole again, its single keys' values views
    of one ids matrix. (The streaming tests with workers above send every batch this way.)"""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    spec, files = spec_and_files
    b = next(iter(StreamingLoader(files, spec, 64, shuffle=True, seed=2)))
    packed = b.pack()
    assert packed.buffer.is_shared()
    c = pickle.loads(ForkingPickler.dumps(packed)).unpack()
    assert len({t.untyped_storage().data_ptr() for t in c.tensors()}) == 1
    assert list(c.sparse) == list(b.sparse) and c.id_keys == b.id_keys
    for k, v in b.sparse.items():
        w = c.sparse[k]
        assert (w.single, w.padded) == (v.single, v.padded)
        assert torch.equal(w.values, v.values) and torch.equal(w.lengths, v.lengths)
    assert torch.equal(c.dense, b.dense) and torch.equal(c.labels, b.labels)
    c.ids.add_(1)
    assert all(torch.equal(c.sparse[k].values, b.sparse[k].values + 1) for k in c.id_keys)
    assert c.sparse["genres"].lengths is c.sparse["gender_genres"].lengths


# --- shards written by other tools ---------------------------------------------------------------

def _own_spec(columns: dict) -> FeatureSpec:
    return FeatureSpec(FeaturesConfig(label="label", columns=columns), {}, list(columns), [])


def _shard(path, u, label=None, utype=pa.int64(), nullable=True):
    n = len(u)
    label = np.arange(n) % 2 if label is None else label
    schema = pa.schema([pa.field("label", pa.int8()), pa.field("u", utype, nullable=nullable)])
    pq.write_table(pa.table({"label": pa.array(label, pa.int8()), "u": pa.array(u, utype)}, schema=schema),
                   path, row_group_size=32)
    return path


def test_streaming_reads_shards_that_differ_in_integer_width_and_nullability(tmp_path):
    """A block of the stream spans files; Arrow cannot join tables of other schemas, so such
    columns are widened: the same rows as in memory, where each row group is read alone."""
    spec = _own_spec({"u": ColumnConfig(kind="categorical", vocab_size=1000)})
    files = [_shard(tmp_path / "a.parquet", np.arange(64)),
             _shard(tmp_path / "b.parquet", np.arange(64, 128), utype=pa.int32()),
             _shard(tmp_path / "c.parquet", np.arange(128, 192), nullable=False)]
    streamed = [x for b in StreamingLoader(files, spec, 32, shuffle=False, shuffle_buffer=192)
                for x in b.sparse["u"].values.tolist()]
    assert streamed == load_table(files, spec).as_batch().sparse["u"].values.tolist() == list(range(192))
    _shard(tmp_path / "c.parquet", [str(i) for i in range(64)], utype=pa.string())
    with pytest.raises(DataError, match=r"a\.parquet, .*b\.parquet, .*c\.parquet: the files' columns have types "
                                        "that do not combine"):
        list(StreamingLoader(files, spec, 32, shuffle=False, shuffle_buffer=192))


def test_a_streamed_bad_value_is_named_by_its_file_row_group_and_row(tmp_path):
    """As the in-memory loader names it, though the stream converts blocks that span files."""
    spec = _own_spec({"u": ColumnConfig(kind="categorical", vocab_size=1000)})
    label = np.arange(100) % 2
    label[42] = 2  # row 10 of the second row group of b.parquet
    files = [_shard(tmp_path / "a.parquet", np.arange(100)), _shard(tmp_path / "b.parquet", np.arange(100), label)]
    message = r"b\.parquet \(row group 1\): label column 'label' holds 2\.0 at row 10; labels must be 0 or 1"
    with pytest.raises(DataError, match=message):
        load_table(files, spec)
    for buffer in (64, 65536):  # a block inside b.parquet, or one that starts in a.parquet
        with pytest.raises(DataError, match=message):
            list(StreamingLoader(files, spec, 32, shuffle=False, shuffle_buffer=buffer))


def test_dictionary_encoded_columns_give_the_ids_of_their_values(tmp_path):
    """pandas categoricals come back from Parquet dictionary-encoded: hashed, looked up in a
    vocabulary, single or multi-hot, they give the ids the plain values give."""
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(["<unknown>", "a", "b"]))  # entry i is id i; 0 the reserved id
    words = pa.array(["a", "b", None, "a", "c"])
    lists = pa.ListArray.from_arrays(pa.array([0, 2, 2, 3, 5, 5]), pa.array(["a", "c", "b", "a", "b"]))
    columns = {"h": ColumnConfig(kind="categorical", hash_buckets=97), "v": ColumnConfig(kind="categorical", vocab_file=str(vocab)),
               "m": ColumnConfig(kind="multi_hot", hash_buckets=97)}
    plain = pa.table({"label": pa.array([0, 1, 0, 1, 0], pa.int8()), "h": words, "v": words, "m": lists})
    encoded = plain.set_column(1, "h", words.dictionary_encode()).set_column(2, "v", words.dictionary_encode()).set_column(
        3, "m", pa.ListArray.from_arrays(lists.offsets, lists.values.dictionary_encode()))
    pq.write_table(encoded, tmp_path / "d.parquet")
    read = pq.read_table(tmp_path / "d.parquet")
    assert all(pa.types.is_dictionary(read[k].type) for k in "hv") and pa.types.is_dictionary(read["m"].type.value_type)
    want, got = (_own_spec(columns).encode(t, "t").as_batch().sparse for t in (plain, read))
    for k in columns:
        assert torch.equal(got[k].values, want[k].values) and torch.equal(got[k].lengths, want[k].lengths)
    assert got["v"].values.tolist() == [1, 2, 0, 1, 0]


def test_more_workers_than_rows_is_a_clear_error(tmp_path):
    """Empty files still count as row groups: the rows are what cannot be split."""
    spec = _own_spec({"u": ColumnConfig(kind="categorical", vocab_size=10)})
    files = [_shard(tmp_path / f"r{i}.parquet", [i]) for i in range(3)] + [_shard(tmp_path / "e.parquet", [])]
    with pytest.raises(DataError, match="3 rows cannot be split over 1 ranks x 4 workers"):
        StreamingLoader(files, spec, 8, num_workers=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_counts_the_unknown_ids_of_every_row_group(tmp_path, workers):
    """The check at start reads 4 sampled row groups; a row group of negative ids between them is
    counted as it is streamed (it trained as id 0 without a word), in workers too, once per epoch."""
    spec = _own_spec({"u": ColumnConfig(kind="categorical", vocab_size=1000)})
    u = np.arange(320) % 900
    u[32:64] = -7  # row group 1: never among the 4 sampled of 10 (0, 2, 5, 7)
    files = [_shard(tmp_path / "a.parquet", u)]
    loader = StreamingLoader(files, spec, 16, num_workers=workers, shuffle_buffer=64, seed=3)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert sum(len(b) for b in loader) == 320
        assert loader.unknown_counts() == {"u": {"values": 320, "out_of_vocab": 32, "missing": 1}}  # u = 0 once
    assert loader.unknown_counts(lambda t: t * 2)["u"]["out_of_vocab"] == 64  # e.g. summed over two ranks


class _FreezingSpec(FeatureSpec):
    """A spec whose encode hangs in a loader worker (a file system that stopped answering)."""

    def encode(self, table, where):
        if torch.utils.data.get_worker_info() is not None:
            import time
            time.sleep(60)
        return super().encode(table, where)


def test_a_frozen_loader_worker_ends_the_run_naming_it(tmp_path):
    from wdl.errors import TrainingError

    spec = _FreezingSpec(FeaturesConfig(label="label", columns={"u": ColumnConfig(kind="categorical", vocab_size=10)}),
                         {}, ["u"], [])
    loader = StreamingLoader([_shard(tmp_path / "a.parquet", np.arange(64) % 10)], spec, 16, num_workers=1, timeout_s=1)
    with pytest.raises(TrainingError, match=r"^data loader worker 0 \(pid \d+\) of rank 0 sent no batch for 1 s "
                                            r"\(data.loader_timeout_s\)"):
        next(iter(loader))
