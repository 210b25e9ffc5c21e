"""Config validation: defaults are filled, unknown keys and wrong types are named."""

import subprocess
import sys

import pytest
import yaml

from cytonet.io.config import ConfigError, load_config, validate_config


def test_defaults_filled_for_empty_config():
    config = validate_config({})
    assert config["results"] == "results"
    assert config["mask"]["resolution_um"] == 32
    assert config["patches"]["sampling"] == "random"
    assert config["demo"]["enabled"] is True


def test_repository_config_is_valid(repo):
    config = load_config(repo / "config.yaml")
    assert config["demo"]["n_brains"] >= 4


def test_misspelt_key_is_named_with_suggestion():
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'mask\.resolutoin_um' \(did you mean 'resolution_um'\?\)"):
        validate_config({"mask": {"resolutoin_um": 16}})


def test_misspelt_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'resluts'"):
        validate_config({"resluts": "out"})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config key 'patches\.count': 'many' is not of type 'integer'"):
        validate_config({"patches": {"count": "many"}})


def test_enum_violation_is_named():
    with pytest.raises(ConfigError, match=r"patches\.sampling"):
        validate_config({"patches": {"sampling": "hexagonal"}})


def test_snakemake_stops_before_any_job_on_misspelt_key(repo, tmp_path):
    bad = yaml.safe_load((repo / "config.yaml").read_text())
    bad["mask"]["resolutoin_um"] = bad["mask"].pop("resolution_um")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(cfg), "--directory", str(repo),
         "--snakefile", str(repo / "Snakefile")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "mask.resolutoin_um" in result.stdout + result.stderr


def test_demo_schema_mirrors_generator_parameters(repo):
    from dataclasses import fields

    from cytonet.synth import DemoParams

    schema = yaml.safe_load((repo / "cytonet/schemas/config.schema.yaml").read_text())
    keys = set(schema["properties"]["demo"]["properties"]) - {"enabled"}
    assert keys == {f.name for f in fields(DemoParams)}
    # Every schema default is accepted by the generator itself.
    DemoParams.from_cfg({k: v for k, v in validate_config({})["demo"].items() if k != "enabled"})


@pytest.mark.parametrize("stage, attribute", [("learn.pretrain", "DEFAULTS"), ("learn.finetune", "DEFAULTS"),
                                              ("preprocess.patches", "DEFAULT_PARAMS"),
                                              ("preprocess.dask_cluster", "DEFAULTS")])
def test_stage_schema_mirrors_module_defaults(repo, stage, attribute):
    import importlib

    defaults = getattr(importlib.import_module(f"cytonet.{stage}"), attribute)
    stage = stage.split(".")[-1]
    schema = yaml.safe_load((repo / "cytonet/schemas/config.schema.yaml").read_text())
    props = schema["properties"][stage.removesuffix("_cluster")]["properties"]
    assert set(props) == set(defaults)
    assert {k: p["default"] for k, p in props.items()} == defaults
