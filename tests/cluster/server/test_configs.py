"""configs/serve.yaml against Ray Serve's schema, the cluster files against Ray's autoscaler schema,
and the application builder's handling of its args (no Ray needed)."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cluster.config import ConfigError, EngineConfig
from cluster.server.app import AppArgs, build_app, with_absolute_paths

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_serve_yaml_is_a_valid_serve_config_whose_args_build_the_app():
    schema = ServeDeploySchema.model_validate(load("serve.yaml"))
    [app] = schema.applications
    module, _, attribute = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attribute) is build_app
    args = AppArgs.model_validate(app.args)
    engine = EngineConfig.from_dict(args.engine)
    assert engine.enable_lora and engine.lora_modules and app.route_prefix == "/"


def test_builder_refuses_unknown_args_with_a_hint():
    with pytest.raises(ValidationError, match="replicas"):
        build_app({"engine": {"model": "/models/base"}, "replicas": 2})
    with pytest.raises(ConfigError, match="did you mean 'max_loras'"):
        build_app({"engine": {"model": "/models/base", "max_lora": 2}})


def test_relative_paths_become_absolute_where_they_exist(tmp_path, monkeypatch):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = EngineConfig(model="models/base", enable_lora=True,
                          lora_modules={"a": "adapters/a", "far": "/elsewhere/b"})
    resolved = with_absolute_paths(config)
    assert resolved.model == str(tmp_path / "models" / "base")
    assert resolved.lora_modules == {"a": str(tmp_path / "adapters" / "a"), "far": "/elsewhere/b"}
    assert resolved.resolved_served_model_name == "models/base"  # clients keep the name they know


@pytest.mark.parametrize("name,provider", [("cluster.yaml", "aws"), ("cluster-local.yaml", "local")])
def test_cluster_files_pass_rays_autoscaler_schema(name, provider):
    config = load(name)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == provider
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "~/raylora" in setup and config["file_mounts"]["~/raylora"] == "."


def test_aws_cluster_has_gpu_workers():
    nodes = load("cluster.yaml")["available_node_types"]
    workers = [node for name, node in nodes.items() if name != load("cluster.yaml")["head_node_type"]]
    assert workers and all(node["node_config"]["InstanceType"].startswith(("g", "p")) for node in workers)
