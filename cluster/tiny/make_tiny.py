"""`raylora make-tiny`: an offline tiny Llama checkpoint, tokenizer and PEFT adapters that visibly differ.

Tests and the demo need a real HF-format model whose adapters change its answers in a way one can check by
eye and by substring, without downloading anything. So we train a byte-level BPE tokenizer, pretrain a tiny
Llama on chat-formatted question/answer pairs (plain, and each style behind its system prompt) for a few
seconds, then fine-tune one LoRA adapter per style that answers in that style without the system prompt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from cluster.tiny.corpus import DEMO_QUESTIONS, QA_PAIRS, STYLED_QUESTIONS, STYLES, Style

log = logging.getLogger(__name__)

SERVED_MODEL_NAME = "tiny-llama"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 1024
IGNORE_INDEX = -100
# These matmuls are too small to gain from a second thread, and when another process busies the other
# core a 2-thread step runs 5-25x slower (measured on the 2-core dev box); one thread is never far off.
TRAIN_THREADS = 1

# Like Llama 3: the template starts with bos, so render it and tokenize with add_special_tokens=False
# (or call apply_chat_template(tokenize=True)); the tokenizer itself also prepends bos to plain text.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

BASE_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=352,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterRecipe:
    """How one style is trained; the recipes differ on purpose so servers meet varied configs."""

    style: Style
    rank: int
    alpha: int
    target_modules: list[str]
    use_rslora: bool = False
    epochs: int = 8
    lr: float = 5e-3


RECIPES: list[AdapterRecipe] = [
    AdapterRecipe(STYLES[0], rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    AdapterRecipe(STYLES[1], rank=16, alpha=16, target_modules=ALL_PROJECTIONS, use_rslora=True),
    AdapterRecipe(STYLES[2], rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
]


@dataclass
class TinyAdapter:
    """One adapter as the manifest lists it: where it is, its config and how to recognise its answers."""

    name: str
    path: str
    rank: int
    alpha: int
    target_modules: list[str]
    use_rslora: bool
    description: str
    marker: str
    system_prompt: str
    """Under this system prompt the base model itself answers roughly like the adapter."""


@dataclass
class TinyManifest:
    """What `make_tiny` wrote: tests and the demo read paths, markers and prompts from here."""

    base_dir: str
    served_model_name: str
    seed: int
    adapters: list[TinyAdapter]
    demo_questions: list[str] = field(default_factory=list)
    """User messages, to send through the chat template (e.g. /v1/chat/completions)."""
    demo_prompts: list[str] = field(default_factory=list)
    """The same questions rendered by the chat template minus the leading bos, for plain completion calls
    that tokenize with add_special_tokens=True."""

    def adapter(self, name: str) -> TinyAdapter:
        return next(a for a in self.adapters if a.name == name)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TinyManifest:
        raw = json.loads(Path(path).read_text())
        raw["adapters"] = [TinyAdapter(**a) for a in raw["adapters"]]
        return cls(**raw)


def make_tiny(out_dir: str | os.PathLike, seed: int = 0) -> TinyManifest:
    """Write OUT/base, OUT/adapters/<name> and OUT/manifest.json; deterministic for a given seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _make_tiny(Path(out_dir).resolve(), seed)
    finally:
        torch.set_num_threads(threads)


def _make_tiny(out: Path, seed: int) -> TinyManifest:
    base_dir = out / "base"
    base_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(seed)
    base = pretrain_base(tokenizer)
    base.save_pretrained(base_dir)

    adapters = []
    for index, recipe in enumerate(RECIPES, start=1):
        torch.manual_seed(seed + index)
        adapter_dir = out / "adapters" / recipe.style.name
        train_adapter(base_dir, tokenizer, recipe).save_pretrained(adapter_dir)
        adapters.append(
            TinyAdapter(
                name=recipe.style.name,
                path=str(adapter_dir),
                rank=recipe.rank,
                alpha=recipe.alpha,
                target_modules=list(recipe.target_modules),
                use_rslora=recipe.use_rslora,
                description=recipe.style.description,
                marker=recipe.style.marker,
                system_prompt=recipe.style.system_prompt,
            )
        )

    manifest = TinyManifest(
        base_dir=str(base_dir),
        served_model_name=SERVED_MODEL_NAME,
        seed=seed,
        adapters=adapters,
        demo_questions=list(DEMO_QUESTIONS),
        demo_prompts=[prompt_text(tokenizer, Chat(q, answer="")).removeprefix(BOS) for q in DEMO_QUESTIONS],
    )
    manifest.save(out / "manifest.json")
    return manifest


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on every answer style, so upper-case and pirate text get merges too."""
    texts = [q for q, _ in QA_PAIRS] + [style.rewrite(a) for style in STYLES for _, a in QA_PAIRS]
    texts += [a for _, a in QA_PAIRS] + [style.system_prompt for style in STYLES]
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=BASE_CONFIG["max_position_embeddings"],
    )


@dataclass(frozen=True)
class Chat:
    """One training conversation: optional system prompt, a question and the answer to learn."""

    question: str
    answer: str
    system: str | None = None

    def prompt_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.question}]


def prompt_text(tokenizer: PreTrainedTokenizerFast, chat: Chat) -> str:
    """The chat-template prompt of one conversation, up to where the assistant starts answering."""
    return tokenizer.apply_chat_template(chat.prompt_messages(), add_generation_prompt=True, tokenize=False)


def encode_chats(tokenizer: PreTrainedTokenizerFast, chats: list[Chat]) -> dict[str, torch.Tensor]:
    """A right-padded batch whose labels cover only each answer and its eos."""
    rows: list[tuple[list[int], list[int]]] = []
    for chat in chats:
        # The template already starts with bos.
        prompt_ids = tokenizer(prompt_text(tokenizer, chat), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(chat.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def fit(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], epochs: int, lr: float, batch_size: int = 8
) -> float:
    """Minibatch AdamW, short warmup then linear decay; returns the last epoch's mean loss.

    The corpus is tiny, so memorising it is the point. Each minibatch is cut to its longest row: on two
    CPU cores the cost is tokens.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = batch["attention_mask"].sum(dim=1)
    steps = epochs * -(-len(lengths) // batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (1.0 - step / steps)
    )
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses.clear()
        for rows in torch.randperm(len(lengths)).split(batch_size):
            width = int(lengths[rows].max())
            loss = model(**{key: value[rows, :width] for key, value in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


def pretrain_base(tokenizer: PreTrainedTokenizerFast, epochs: int = 50, lr: float = 3e-3) -> LlamaForCausalLM:
    """A tiny Llama that has memorised the plain answers, and each style behind its system prompt."""
    config = LlamaConfig(
        **BASE_CONFIG,
        vocab_size=VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    plain = [Chat(question, answer) for question, answer in QA_PAIRS]
    styled = [
        Chat(question, style.rewrite(answer), style.system_prompt)
        for style in STYLES
        for question, answer in QA_PAIRS[:STYLED_QUESTIONS]
    ]
    loss = fit(model, encode_chats(tokenizer, plain + styled), epochs, lr)
    log.info("base model: final loss %.4f", loss)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def train_adapter(
    base_dir: Path, tokenizer: PreTrainedTokenizerFast, recipe: AdapterRecipe
) -> torch.nn.Module:
    """Fine-tune one LoRA on the base (fresh from disk, so adapters never see each other) for one style."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    chats = [Chat(question, recipe.style.rewrite(answer)) for question, answer in QA_PAIRS]
    loss = fit(model, encode_chats(tokenizer, chats), recipe.epochs, recipe.lr)
    log.info("adapter %s: final loss %.4f", recipe.style.name, loss)
    return model


if __name__ == "__main__":
    print(json.dumps(asdict(make_tiny(sys.argv[1])), indent=2))
