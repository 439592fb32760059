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
    ("optim.deep.l2=0.1", "optim.deep.l1/l2 are FTRL's; with adagrad use optim.deep.weight_decay"),
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
