"""Typed configs: defaults, YAML, --set overrides, CLI options, validation messages."""

from __future__ import annotations

import pytest
import yaml

from mwm.cli.data import ConvertConfig
from mwm.config import ConfigError, parse_sets, resolve, save_config


def test_precedence_yaml_set_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("source: a\nout: b.npz\nsize: 64\nchannels: 3\nread: {window: lung}\n")
    cfg = resolve(ConvertConfig, f, ["size=96", "read.nifti_axis=1"], {"channels": 1, "resize": None})
    assert (cfg.size, cfg.channels, cfg.resize) == (96, 1, "pad")
    assert cfg.read.window == "lung" and cfg.read.nifti_axis == 1
    saved = save_config(cfg, tmp_path / "out.yaml")
    assert resolve(ConvertConfig, saved) == cfg


def test_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"size: .*greater than or equal to 8"):
        resolve(ConvertConfig, None, None, {"source": "a", "out": "b", "size": 2})
    with pytest.raises(ConfigError, match=r"read.window"):
        resolve(ConvertConfig, None, ["read.window=soft"], {"source": "a", "out": "b"})
    with pytest.raises(ConfigError, match="window_center and window_width"):
        resolve(ConvertConfig, None, ["read.window_center=40"], {"source": "a", "out": "b"})
    with pytest.raises(ConfigError, match="Extra inputs"):
        resolve(ConvertConfig, None, ["sise=3"], {"source": "a", "out": "b"})
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(ConvertConfig, tmp_path / "bad.yaml")


def test_parse_sets_types():
    assert parse_sets(["a.b=1", "c=[1, 2]", "d=lung", "e=true"]) == {"a": {"b": 1}, "c": [1, 2], "d": "lung", "e": True}
    with pytest.raises(ConfigError):
        parse_sets(["novalue"])
    assert yaml.safe_load("x: 1") == {"x": 1}
