"""The config reference is made from wdl/config.py: every field needs a comment, and
docs/config-reference.md must be what `wdl config reference` writes today."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from wdl.config import load_config
from wdl.config_reference import REFERENCE, keys, reference
from wdl.errors import ConfigError


def test_docs_reference_is_current():
    written = (ROOT / REFERENCE).read_text(encoding="utf-8")
    assert written == reference(), ("docs/config-reference.md is stale: run "
                                    "`wdl config reference --out docs/config-reference.md` and commit it")


def test_every_key_is_listed_with_its_default_and_meaning():
    by_path = {k.path: k for k in keys()}
    assert by_path["optim.deep.weight_decay"].meaning and by_path["optim.deep.weight_decay"].default == "0.0"
    assert by_path["optim.wide.name"].default == "ftrl" and by_path["optim.deep.name"].default == "adagrad"
    assert by_path["model.deep.interaction"].allowed == "none \\| dot \\| fm"
    assert "reduce-overhead" in by_path["train.compile"].allowed
    assert "features.columns.NAME.vocab_size" in by_path and "train.threads" in by_path
    assert all(k.meaning for k in keys())


def _module(tmp_path: Path, body: str):
    path = tmp_path / "cfg_under_test.py"
    path.write_text("from dataclasses import dataclass, field\n\n\n" + body)
    spec = importlib.util.spec_from_file_location("cfg_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cfg_under_test"] = module  # dataclasses resolve annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["cfg_under_test"]
    return module


def test_a_field_without_a_comment_fails(tmp_path):
    documented = _module(tmp_path, '''
@dataclass
class Inner:
    # how many, said above the field
    n: int = 3


@dataclass
class Config:
    rate: float = 0.5  # said beside the field
    inner: Inner = field(default_factory=Inner)
''')
    assert [(k.path, k.default, k.meaning) for k in keys(documented)] == [
        ("rate", "0.5", "said beside the field"), ("inner.n", "3", "how many, said above the field")]

    added = _module(tmp_path, '''
@dataclass
class Config:
    rate: float = 0.5  # said beside the field

    new_knob: int = 1
''')
    with pytest.raises(ConfigError, match=r"Config\.new_knob"):
        keys(added)


def wdl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wdl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_reference_and_show(tmp_path):
    out = tmp_path / "ref.md"
    done = wdl("config", "reference", "--out", str(out))
    assert done.returncode == 0 and out.read_text() == reference() and not done.stderr, done.stderr

    done = wdl("config", "show", "--config", "configs/movielens-100k.yaml", "train.epochs=3")
    assert done.returncode == 0 and not done.stderr, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["train"]["epochs"] == 3 and shown["train"]["threads"] == 0  # a default the file leaves out
    assert shown["optim"]["deep"]["weight_decay"] == 0.0 and shown["model"]["deep"]["interaction"] == "fm"
    (tmp_path / "shown.yaml").write_text(done.stdout)
    assert load_config(tmp_path / "shown.yaml") == load_config(ROOT / "configs/movielens-100k.yaml", ["train.epochs=3"])


@pytest.mark.parametrize("args, says", [
    (("config", "show", "--config", "configs/no-such.yaml"), "config file not found"),
    (("config", "show", "--config", "configs/movielens-100k.yaml", "train.epoch=3"), "unknown config key 'train.epoch'"),
    (("config", "reference", "--out", "/proc/ref.md"), "--out /proc/ref.md: cannot write it"),
])
def test_bad_input_is_one_line(args, says):
    done = wdl(*args)
    assert done.returncode == 2 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr
