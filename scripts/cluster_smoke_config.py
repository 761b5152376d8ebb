"""Render the smoke test's `ray up` file from configs/cluster-local.yaml: one head on 127.0.0.1.

Only what a loopback cluster on this machine needs is changed; everything else (cluster layout,
start commands, their flags) stays the committed file's, so the smoke run tests that file:

- provider: head_ip 127.0.0.1, no workers; auth: root with the throwaway key.
- file_mounts: none. The head is this machine and its checkout is this one; `~/raylora` (where the
  committed file syncs the checkout) becomes this checkout's path in the commands.
- setup_commands: the cluster's environment is this checkout's `.venv`, made or refreshed by
  `scripts/setup_venv.sh` (which installs the checkout into it) and put first on PATH in ~/.bashrc,
  which Ray sources before every command it runs on a node (`ray down` runs a bare `ray stop`).
- head start flags that keep this head apart from other Ray instances on the machine: its own temp
  dir (so `ray.init()` elsewhere does not find and join it) and a dashboard agent port of its own
  (52365 belongs to whichever instance started first). Ray turns a node IP of 127.0.0.1 into the
  machine's own address, so the node IP is left to Ray; clients use 127.0.0.1.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "configs" / "cluster-local.yaml"
ENV_MARKER = "# raylora cluster smoke"


def render(key: Path, temp_dir: str, agent_port: int, cluster_name: str) -> dict:
    config = copy.deepcopy(yaml.safe_load(SOURCE.read_text()))
    checkout = str(REPO)
    config["cluster_name"] = cluster_name
    config["provider"] |= {"head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    config["file_mounts"] = {}
    config["setup_commands"] = [
        f"grep -qs '{ENV_MARKER}' ~/.bashrc || echo 'export PATH={checkout}/.venv/bin:$PATH  {ENV_MARKER}' >> ~/.bashrc",
        f"cd {checkout} && ./scripts/setup_venv.sh",
    ]
    flags = f" --temp-dir={temp_dir} --dashboard-agent-listen-port={agent_port}"
    head = []
    for command in config["head_start_ray_commands"]:
        command = command.replace("~/raylora", checkout)
        if "ray start --head" in command:
            command = command.replace("ray start --head", "ray start --head" + flags)
        head.append(command)
    config["head_start_ray_commands"] = head
    config["worker_start_ray_commands"] = []
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", type=Path, required=True, help="the throwaway SSH private key")
    parser.add_argument("--temp-dir", required=True, help="the head's Ray temp dir")
    parser.add_argument("--agent-port", type=int, required=True, help="the head's dashboard agent port")
    parser.add_argument("--cluster-name", default="raylora-smoke")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = render(args.key, args.temp_dir, args.agent_port, args.cluster_name)
    args.out.write_text(f"# Rendered by {Path(__file__).name} from {SOURCE.relative_to(REPO)}\n"
                        + yaml.safe_dump(config, sort_keys=False, width=1000))


if __name__ == "__main__":
    main()
