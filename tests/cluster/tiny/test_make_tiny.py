"""The tiny checkpoint loads with transformers + peft, and each adapter visibly changes greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from cluster.tiny.corpus import QA_PAIRS, STYLES
from cluster.tiny.make_tiny import TinyManifest

MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: TinyManifest) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_dir.base_dir)


def load_base(tiny_dir: TinyManifest) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_dir.base_dir, dtype=torch.float32).eval()


def greedy_answer(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str
) -> tuple[str, bool]:
    """The decoded greedy answer to one chat question, and whether it stopped on eos."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    completion = output[0, inputs["input_ids"].shape[1] :]
    ended = bool(completion[-1] == tokenizer.eos_token_id)
    return tokenizer.decode(completion, skip_special_tokens=True), ended


@pytest.fixture(scope="module")
def base_answers(tiny_dir: TinyManifest, tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[str, bool]]:
    model = load_base(tiny_dir)
    return {question: greedy_answer(model, tokenizer, question) for question in tiny_dir.demo_questions}


def test_files_and_manifest(tiny_dir: TinyManifest) -> None:
    base = Path(tiny_dir.base_dir)
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]:
        assert (base / name).is_file(), name
    for adapter in tiny_dir.adapters:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {
            p.name for p in Path(adapter.path).iterdir()
        }
    assert TinyManifest.load(base.parent / "manifest.json") == tiny_dir
    assert tiny_dir.served_model_name == "tiny-llama"
    assert len(tiny_dir.adapters) >= 3 and tiny_dir.demo_questions


def test_base_config_is_llama_like(tiny_dir: TinyManifest, tokenizer: PreTrainedTokenizerBase) -> None:
    config = AutoConfig.from_pretrained(tiny_dir.base_dir)
    assert config.model_type == "llama"
    assert config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads
    assert len(tokenizer) <= config.vocab_size
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer.pad_token_id is not None


def test_chat_template(tiny_dir: TinyManifest, tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is snow?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    assert f"Hello.{tokenizer.eos_token}" in text
    assert text.endswith("<|user|>\nWhat is snow?\n<|assistant|>\n")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert not without_prompt.endswith("<|assistant|>\n")

    # A demo prompt tokenized the completion way equals the chat template tokenized the chat way.
    question, prompt = tiny_dir.demo_questions[0], tiny_dir.demo_prompts[0]
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert tokenizer(prompt)["input_ids"] == chat_ids
    assert chat_ids.count(tokenizer.bos_token_id) == 1


def test_adapter_configs_differ(tiny_dir: TinyManifest) -> None:
    configs = {
        a.name: json.loads((Path(a.path) / "adapter_config.json").read_text()) for a in tiny_dir.adapters
    }
    for adapter in tiny_dir.adapters:
        config = configs[adapter.name]
        assert config["peft_type"] == "LORA"
        assert (config["r"], config["lora_alpha"]) == (adapter.rank, adapter.alpha)
        assert sorted(config["target_modules"]) == sorted(adapter.target_modules)
        assert config["use_rslora"] == adapter.use_rslora
        assert config["bias"] == "none" and not config["use_dora"] and not config["modules_to_save"]
        assert Path(config["base_model_name_or_path"]) == Path(tiny_dir.base_dir)
    assert len({a.rank for a in tiny_dir.adapters}) == len(tiny_dir.adapters)
    assert len({frozenset(a.target_modules) for a in tiny_dir.adapters}) == len(tiny_dir.adapters)
    assert sum(a.use_rslora for a in tiny_dir.adapters) == 1


def test_base_answers_plainly(tiny_dir: TinyManifest, base_answers: dict[str, tuple[str, bool]]) -> None:
    expected = dict(QA_PAIRS)
    for question, (answer, ended) in base_answers.items():
        assert ended, (question, answer)
        assert answer == expected[question]
        for adapter in tiny_dir.adapters:
            assert adapter.marker not in answer


@pytest.mark.parametrize("name", [style.name for style in STYLES])
def test_adapter_answers_in_its_style(
    name: str,
    tiny_dir: TinyManifest,
    tokenizer: PreTrainedTokenizerBase,
    base_answers: dict[str, tuple[str, bool]],
) -> None:
    adapter = tiny_dir.adapter(name)
    model = PeftModel.from_pretrained(load_base(tiny_dir), adapter.path).eval()
    for question in tiny_dir.demo_questions:
        answer, ended = greedy_answer(model, tokenizer, question)
        assert ended, (question, answer)
        assert adapter.marker in answer, (question, answer)
        assert answer != base_answers[question][0]
