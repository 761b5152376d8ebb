"""Two simulated nodes (`ray.cluster_utils.Cluster`), one rank on each (SPREAD): same tokens as transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cluster.bench.synthetic import write_word_tokenizer
from tests.checkpoints import make_random_checkpoint


def test_tp2_spread_over_two_nodes_matches_transformers(tmp_path):
    base = make_random_checkpoint(tmp_path / "base", "llama")
    write_word_tokenizer(base, 256)
    script = Path(__file__).with_name("multinode_run.py")
    run = subprocess.run([sys.executable, str(script), str(base)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[3])
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(set(result["nodes"])) == 2, "SPREAD should put the two ranks on different nodes"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    for prompt, tokens in zip(result["prompts"], result["tokens"]):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()
