import pytest

from wdl.config import Config, load_config
from wdl.errors import ConfigError

from helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "movielens-100k.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_documents_its_launch_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "launch/train.py" in first + path.read_text().splitlines()[1]


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(ROOT / "configs" / "movielens-100k.yaml",
                      ["train.epochs=3", "optim.deep.lr=0.5", "model.deep.hidden=[8, 4]", "data.in_memory=false",
                       "optim.wide.l2=1e-6"])
    assert cfg.train.epochs == 3 and cfg.optim.deep.lr == 0.5 and cfg.optim.wide.l2 == 1e-6
    assert cfg.model.deep.hidden == [8, 4] and cfg.data.in_memory is False


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {epochs: 2, epocs: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epocs'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.deep.hiden'"):
        load_config(None, ["model.deep.hiden=[1]"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=two", "train.epochs: expected an integer"),
    ("model.kind=linear", "model.kind: 'linear' is not one of"),
    ("data.in_memory=3", "expected true/false"),
    ("distributed.sharding=diagonal", "distributed.sharding"),
    ("noequals", "not of the form"),
    ("train.epochs=0", "train.epochs: must be >= 1"),
    ("optim.deep.lr=-1", "optim.deep.lr: must be > 0"),
    ("optim.wide.l1=-0.1", "optim.wide.l1: must be >= 0"),
    ("model.deep.hidden=[0]", "model.deep.hidden: every layer"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("train.eval_only=true", "give it with checkpoint.resume"),
    ("run.name=../../escape", "run.name='../../escape': must be a plain folder name"),
    ("run.name=a/b", "must be a plain folder name"),
    ("optim.deep.l1=0.1", "optim.deep.l1 is FTRL.s; with adagrad use optim.deep.l2"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(ROOT / "configs" / "movielens-100k.yaml", [override])
    assert "\n" not in str(e.value)


def test_cross_field_checks():
    base = ROOT / "configs" / "movielens-100k.yaml"
    with pytest.raises(ConfigError, match="model.wide.features: 'nope'"):
        load_config(base, ["model.wide.features=[nope]"])
    with pytest.raises(ConfigError, match="at most one multi_hot"):
        load_config(base, ["features.columns.tags={kind: multi_hot, hash_buckets: 10}",
                           "features.crosses.x={columns: [genres, tags]}"])
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(base, ["features.columns.user_id={kind: categorical, vocab_size: 3, hash_buckets: 4}"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("run:\n  name: x\n   seed: 1\n")  # the line and column of the fault are named
    with pytest.raises(ConfigError, match=r"bad.yaml:3:8: invalid YAML: mapping values are not allowed here"):
        load_config(bad)


def test_bad_device_is_a_one_line_error():
    from wdl.distributed.env import pick_device

    for spec in ("banana", "meta"):
        with pytest.raises(ConfigError, match="run.device"):
            pick_device(spec, 0)


# A partly given section changes only what it names; every other key keeps the file's value or,
# where the file is silent, the default of the section it sits in (optim.wide's is FTRL's).
# Per top-level section: (what the file sets beyond movielens-100k.yaml, the one override, path, value).
PARTIAL = {
    "run": ({"name": "x", "seed": 7, "device": "cpu", "collective_timeout_s": 60}, "run.seed=9", ["seed"], 9),
    "data": ({"batch_size": 64, "num_workers": 1, "prepare": {"source": "movielens", "variant": "ml-1m"}},
             "data.prepare.variant=ml-100k", ["prepare", "variant"], "ml-100k"),
    "features": ({"columns": {"user_id": {"kind": "categorical", "vocab_size": 50}}},
                 "features.columns.user_id.vocab_size=60", ["columns", "user_id", "vocab_size"], 60),
    "model": ({"deep": {"hidden": [16, 8], "dropout": 0.25}}, "model.deep.dropout=0.1", ["deep", "dropout"], 0.1),
    "optim": ({"wide": {"l1": 0.5, "beta": 0.5}, "deep": {"initial_accumulator_value": 0.1}},
              "optim.wide.lr=0.07", ["wide", "lr"], 0.07),
    "train": ({"epochs": 3, "early_stopping": {"metric": "logloss", "min_delta": 0.01}, "ranking_k": 5},
              "train.early_stopping.min_delta=0.02", ["early_stopping", "min_delta"], 0.02),
    "distributed": ({"sharding": "table_wise", "tables": {"deep_user_id": "column_wise"}},
                    "distributed.sharding=column_wise", ["sharding"], "column_wise"),
    "checkpoint": ({"every_steps": 10, "keep": 5, "at_epoch_end": False}, "checkpoint.keep=2", ["keep"], 2),
}


def _merged_file(tmp_path, section, changes):
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "movielens-100k.yaml").read_text())
    merged = dict(raw.get(section) or {})
    for k, v in changes.items():  # nested sections given in part here too
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**raw, section: merged}))
    return path


def _set(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def test_every_section_is_covered():
    assert set(PARTIAL) == set(Config().to_dict())


@pytest.mark.parametrize("section", PARTIAL)
def test_a_dotted_override_changes_only_its_key(tmp_path, section):
    changes, override, path, value = PARTIAL[section]
    file = _merged_file(tmp_path, section, changes)
    before = load_config(file).to_dict()
    after = load_config(file, [override]).to_dict()
    assert before[section] != after[section]
    _set(before[section], path, value)
    assert after == before


# features and model cannot be given in part here: a run needs the file's columns and wide features.
@pytest.mark.parametrize("section", [s for s in PARTIAL if s not in ("features", "model")])
def test_a_partial_section_in_a_file_keeps_the_defaults_of_the_rest(tmp_path, section):
    import yaml

    _, override, path, value = PARTIAL[section]
    raw = yaml.safe_load((ROOT / "configs" / "movielens-100k.yaml").read_text())
    raw["train"].pop("refit")  # a data section in part holds out no rows (the default): none to refit on
    whole = load_config(ROOT / "configs" / "movielens-100k.yaml", ["train.refit=false"]).to_dict()
    # The file names only the key of the override, as a nested mapping; the rest of the section
    # is the default's.
    partial = value
    for key in reversed(path):
        partial = {key: partial}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**{k: v for k, v in raw.items() if k != section}, section: partial}))
    expected = Config().to_dict()[section]
    _set(expected, path, value)
    assert load_config(p).to_dict()[section] == expected
    assert {k: v for k, v in load_config(p).to_dict().items() if k != section} == \
        {k: v for k, v in whole.items() if k != section}


def test_optimizers_given_in_part_stay_ftrl_and_adagrad(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text((ROOT / "configs" / "movielens-100k.yaml").read_text().split("\noptim:")[0]
                 + "\noptim: {wide: {lr: 0.05}}\n")
    cfg = load_config(p, ["optim.deep.lr=0.03"])
    assert (cfg.optim.wide.name, cfg.optim.wide.lr) == ("ftrl", 0.05)
    assert (cfg.optim.deep.name, cfg.optim.deep.lr) == ("adagrad", 0.03)
    p.write_text((ROOT / "configs" / "movielens-100k.yaml").read_text().split("\noptim:")[0])  # no optim at all
    cfg = load_config(p, ["optim.wide.lr=0.05"])
    assert (cfg.optim.wide.name, cfg.optim.wide.lr, cfg.optim.deep.name) == ("ftrl", 0.05, "adagrad")


def test_an_override_mapping_merges_into_a_section_but_replaces_a_plain_mapping():
    base = ROOT / "configs" / "movielens-100k.yaml"
    cfg = load_config(base, ["optim.wide={lr: 0.2}", "model.deep.embeddings={user_id: 8, movie_id: 8}",
                             "model.deep.interaction=none", "features.columns.user_id={vocab_size: 10}"])
    assert (cfg.optim.wide.name, cfg.optim.wide.lr, cfg.optim.wide.beta) == ("ftrl", 0.2, 0.001)
    assert cfg.model.deep.embeddings == {"user_id": 8, "movie_id": 8}
    assert (cfg.features.columns["user_id"].kind, cfg.features.columns["user_id"].vocab_size) == ("categorical", 10)


def test_naming_a_columns_id_source_drops_the_one_the_file_gave():
    # vocab_size, hash_buckets and vocab_file exclude each other: merging would keep both and be refused
    cfg = load_config(ROOT / "configs" / "movielens-100k.yaml", ["features.columns.user_id={hash_buckets: 64}"])
    col = cfg.features.columns["user_id"]
    assert (col.kind, col.vocab_size, col.hash_buckets) == ("categorical", None, 64)
