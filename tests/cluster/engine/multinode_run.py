"""Run by test_multinode.py in its own process: a simulated two-node Ray cluster, TP=2 SPREAD.

Prints one JSON line: the node of each rank and the token ids of each request.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from cluster import EngineConfig, SamplingParams, launch


def main(model_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        driver = launch(EngineConfig(
            model=model_dir, device="cpu", dtype="float32", max_model_len=64, block_size=4,
            cpu_kv_cache_bytes=2 << 20, tensor_parallel_size=2, placement_strategy="SPREAD",
            torch_threads_per_worker=1,
        ))
        nodes = ray.get(driver.worker_nodes.remote())
        prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [40, 41]]
        outputs = ray.get(driver.generate.remote(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
        print(json.dumps({"nodes": nodes, "tokens": [o.token_ids for o in outputs], "prompts": prompts}))
        ray.get(driver.shutdown.remote())
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
