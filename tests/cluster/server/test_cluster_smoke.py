"""The Ray user's path end to end: scripts/cluster_smoke.sh (`ray up` over SSH to 127.0.0.1, `serve deploy`,
the openai client, a `ray job` with a `ray.get` handle, `serve shutdown`, `ray down`, nothing left)."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "cluster_smoke.sh"


def load_renderer():
    spec = importlib.util.spec_from_file_location("cluster_smoke_config", REPO / "scripts" / "cluster_smoke_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_files_start_ray_in_the_checkout(name):
    """Relative paths in serve.yaml resolve against the directory `ray start` ran in."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "cd ~/raylora && ray start" in command


def test_rendered_cluster_file_is_one_loopback_head_on_this_checkout(tmp_path):
    config = load_renderer().render(tmp_path / "key", "/tmp/smoke-ray", 52366, "raylora-smoke")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert config["auth"]["ssh_private_key"] == str(tmp_path / "key") and config["file_mounts"] == {}
    assert any(f"cd {REPO} && ./scripts/setup_venv.sh" in command for command in config["setup_commands"])
    [start] = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    assert f"cd {REPO} && ray start --head --temp-dir=/tmp/smoke-ray --dashboard-agent-listen-port=52366" in start
    assert "--port=6379" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the smoke test installs and starts sshd: it runs as root")
def test_cluster_smoke_script_passes():
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1800)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "cluster smoke passed" in result.stdout
    for step in ("ray-up", "serve-deploy", "openai-client", "ray-job-ray-get", "ray-down", "nothing-left"):
        assert f"] {step}" in result.stdout
