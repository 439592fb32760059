"""The one description of the tables (wdl.data.tables) against what the code allocates."""

from __future__ import annotations

import torch

from wdl.config import OptimizerConfig, load_config
from wdl.data.tables import STATE_FLOATS, model_reads, state_bytes, tables
from wdl.train.sparse_optim import row_rule


def test_state_bytes_are_what_the_row_rules_allocate():
    for name in STATE_FLOATS:
        rule = row_rule(OptimizerConfig(name=name))
        for dim in (1, 4, 16):
            state = rule.init_state(1, dim, torch.device("meta"))
            assert state_bytes(OptimizerConfig(name=name), dim) == sum(
                state[k].numel() * state[k].element_size() for k in rule.per_row), (name, dim)


def test_each_kind_reads_its_parts_only(tiny_config):
    cfg = load_config(tiny_config)  # wide: ftrl over 6 features; deep: adam, user/movie 8, genres 4
    rows = dict.fromkeys(["user_id", "movie_id", "gender", "genres", "gender_movie", "gender_genres"], 10)
    for kind, wide, deep in (("wide_deep", 6, 3), ("wide", 6, 0), ("deep", 0, 3)):
        cfg.model.kind = kind
        reads = model_reads(cfg.model)
        assert (len(reads.wide_features), len(reads.deep_embeddings)) == (wide, deep)
        assert reads.dense == (("release_year",) if deep else ())
        ts = tables(cfg, rows, "torchrec")
        assert [t.part for t in ts] == ["wide"] * wide + ["deep"] * deep
    ts = {t.name: t for t in tables(cfg, rows, "torchrec", "fp16")}
    # TorchRec's fp16 weights + adam's two moments in fp32
    assert ts["deep_user_id"].owner == "torchrec" and ts["deep_user_id"].bytes_per_row == 2 * 8 + 2 * 4 * 8
    cfg.model.kind = "wide_deep"
    ts = {t.name: t for t in tables(cfg, rows, "torch", "fp16")}
    assert ts["deep_genres"].owner == "wdl" and ts["deep_genres"].bytes == 10 * (4 * 4 + 2 * 4 * 4)  # fused: fp32
    assert ts["wide_gender"].bytes_per_row == 4 + 8  # a weight, FTRL's z and n
