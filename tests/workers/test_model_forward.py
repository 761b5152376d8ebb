"""Our models against transformers: the same checkpoint must give the same logits.

Several sequences of different lengths run as one flat prefill batch through the paged KV
cache (blocks deliberately scattered), then two decode steps feed transformers' greedy tokens
back; every step's last-token logits must match transformers' within float32 noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.checkpoints import make_random_checkpoint
from workers.attention import Attention, AttentionMetadata
from workers.distributed import destroy_tensor_parallel, init_tensor_parallel
from workers.models.config import ModelConfig, load_model_config
from workers.models.registry import get_model_class
from workers.weight_loader import load_weights

BLOCK_SIZE = 4
NUM_BLOCKS = 24
PROMPT_LENGTHS = (5, 11, 3)
DECODE_STEPS = 2
ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that the tiny head_dim has frequencies in all three llama3 bands.
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama_linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama_biases_wide_heads": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
}


class PagedRun:
    """Drives a model step by step through a paged KV cache, the way the model runner will."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], seed: int = 0) -> None:
        self.model = model
        self.tokens = [list(prompt) for prompt in prompts]
        self.cached = [0] * len(prompts)
        for module in model.modules():
            if isinstance(module, Attention):
                module.allocate_cache(NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"))
        blocks_per_seq = -(-(max(map(len, prompts)) + DECODE_STEPS) // BLOCK_SIZE)
        scattered = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed))
        self.block_tables = scattered[: len(prompts) * blocks_per_seq].view(len(prompts), blocks_per_seq)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Run every token not yet in the cache; last-token logits per sequence [B, vocab]."""
        input_ids, positions, slots = [], [], []
        for seq, tokens in enumerate(self.tokens):
            for position in range(self.cached[seq], len(tokens)):
                input_ids.append(tokens[position])
                positions.append(position)
                block = self.block_tables[seq, position // BLOCK_SIZE]
                slots.append(int(block) * BLOCK_SIZE + position % BLOCK_SIZE)
        query_lens = torch.tensor([len(tokens) - done for tokens, done in zip(self.tokens, self.cached)])
        context_lens = torch.tensor([len(tokens) for tokens in self.tokens])
        positions_t = torch.tensor(positions)
        meta = AttentionMetadata.build(
            positions_t, query_lens, context_lens, self.block_tables, torch.tensor(slots), BLOCK_SIZE,
            is_prefill=bool(query_lens.max() > 1),
        )
        hidden = self.model(torch.tensor(input_ids), positions_t, meta)
        self.cached = [len(tokens) for tokens in self.tokens]
        return self.model.compute_logits(hidden[torch.cumsum(query_lens, 0) - 1])

    def append(self, next_tokens: list[int]) -> None:
        for tokens, token in zip(self.tokens, next_tokens):
            tokens.append(token)


def build_model(model_dir: Path) -> torch.nn.Module:
    config = load_model_config(model_dir)
    model = get_model_class(config)(config)
    load_weights(model, model_dir, torch.float32)
    return model.eval()


def random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


@torch.no_grad()
def hf_last_logits(hf_model: torch.nn.Module, sequences: list[list[int]]) -> torch.Tensor:
    return torch.stack([hf_model(torch.tensor([tokens])).logits[0, -1] for tokens in sequences])


def hf_reference(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' last-token logits for the prefill and each greedy decode step."""
    from transformers import AutoModelForCausalLM  # here, so spawned workers need not import it

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sequences = [list(prompt) for prompt in prompts]
    steps = [hf_last_logits(hf_model, sequences)]
    for _ in range(DECODE_STEPS):
        for tokens, token in zip(sequences, steps[-1].argmax(-1).tolist()):
            tokens.append(token)
        steps.append(hf_last_logits(hf_model, sequences))
    return steps


def run_ours(model: torch.nn.Module, prompts: list[list[int]], expected: list[torch.Tensor]) -> list[torch.Tensor]:
    """Our logits per step, feeding the reference's greedy tokens so both see the same sequences."""
    run = PagedRun(model, prompts)
    steps = [run.step()]
    for reference in expected[:-1]:
        run.append(reference.argmax(-1).tolist())
        steps.append(run.step())
    return steps


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    arch, overrides = CASES[case]
    model_dir = make_random_checkpoint(tmp_path / case, arch, **overrides)
    prompts = random_prompts(256)
    expected = hf_reference(model_dir, prompts)
    ours = run_ours(build_model(model_dir), prompts, expected)
    for step, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, step=step: f"step {step}: {m}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def _tensor_parallel_worker(rank: int, world: int, model_dir: Path, prompts: list, expected: list, out: Path) -> None:
    torch.set_num_threads(1)
    init_tensor_parallel(rank, world, f"file://{out / 'rendezvous'}", "gloo")
    try:
        steps = run_ours(build_model(model_dir), prompts, expected)
        torch.save(steps, out / f"rank{rank}.pt")
    finally:
        destroy_tensor_parallel()


def test_tensor_parallel_two_ranks_match_transformers(tmp_path: Path) -> None:
    """tp=2 over gloo: one kv head replicated on both ranks, a vocabulary that needs padding,
    sharded q/k/v biases and a replicated o_proj-free Qwen2 layout."""
    model_dir = make_random_checkpoint(tmp_path / "ckpt", "qwen2", num_key_value_heads=1, vocab_size=255)
    prompts = random_prompts(255)
    expected = hf_reference(model_dir, prompts)
    mp.spawn(_tensor_parallel_worker, args=(2, model_dir, prompts, expected, tmp_path), nprocs=2)
    for rank in range(2):
        ours = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(ours, expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# --- config parsing -------------------------------------------------------------------------------------------

LLAMA_4X = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
}


def test_config_transformers_4x_and_5x_forms_agree() -> None:
    old = ModelConfig.from_dict(LLAMA_4X)
    new_form = {key: value for key, value in LLAMA_4X.items() if key not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new_form["rope_parameters"] = {**LLAMA_4X["rope_scaling"], "rope_theta": 500000.0}
    new_form["dtype"] = "bfloat16"
    assert ModelConfig.from_dict(new_form) == old
    assert old.rope.rope_type == "llama3" and old.rope.theta == 500000.0
    assert old.head_dim == 128 and old.torch_dtype == torch.bfloat16
    assert old.eos_token_ids == [128001, 128008, 128009]


def test_config_legacy_rope_type_key_and_qwen2_biases() -> None:
    raw = {**LLAMA_4X, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert ModelConfig.from_dict(raw).rope.rope_type == "linear"
    qwen = {**LLAMA_4X, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_scaling": None,
            "sliding_window": 131072, "use_sliding_window": False}
    config = ModelConfig.from_dict(qwen)
    assert (config.qkv_bias, config.o_proj_bias, config.sliding_window) == (True, False, None)


def test_config_refuses_unsupported_rope_and_architecture() -> None:
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**LLAMA_4X, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        get_model_class(ModelConfig.from_dict({**LLAMA_4X, "architectures": ["GPT2LMHeadModel"]}))


def test_sliding_window_is_ignored_only_when_it_cannot_matter() -> None:
    config = ModelConfig.from_dict({**LLAMA_4X, "model_type": "mistral", "sliding_window": 4096})
    config.check_max_model_len(4096)
    with pytest.raises(ValueError, match="sliding_window"):
        config.check_max_model_len(8192)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        config.check_max_model_len(200_000)


def test_generation_config_adds_stop_tokens(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_4X, "eos_token_id": 128001}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert load_model_config(tmp_path).eos_token_ids == [128001, 128009]
