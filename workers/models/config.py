"""The base model's shape, read from the raw `config.json`.

Parsed by hand rather than through transformers' config classes so that the driver and the
workers agree on one small, typed view and so that both the transformers 4.x spelling
(`rope_theta`, `rope_scaling`, `torch_dtype`) and the 5.x spelling (`rope_parameters`, `dtype`)
of the same checkpoint give the same result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `factor` etc. only matter for the scaled rope types."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    architectures: list[str]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    dtype: str | None = None  # as written in the checkpoint: "bfloat16", "float32", ...
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a `config.json` dict; unsupported features are an error here, before any worker starts."""
        model_type = raw.get("model_type", "")
        heads = raw["num_attention_heads"]
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (only 'silu')")
        attention_bias = bool(raw.get("attention_bias", False))
        is_qwen2 = model_type == "qwen2"
        return cls(
            architectures=list(raw.get("architectures") or []),
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and never an o_proj bias; Llama/Mistral follow attention_bias.
            qkv_bias=is_qwen2 or attention_bias,
            o_proj_bias=not is_qwen2 and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            rope=_parse_rope(raw),
            dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_list(raw.get("eos_token_id")),
            sliding_window=_parse_sliding_window(raw),
        )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype as a torch dtype, for `dtype="auto"`."""
        return getattr(torch, self.dtype) if self.dtype else None

    def check_max_model_len(self, max_model_len: int) -> None:
        """Refuse a context length this model cannot serve exactly.

        Our attention is full causal attention. A Mistral-style sliding window at least as long
        as `max_model_len` never hides a key, so it is ignored; a shorter one would change the
        results, so it is refused rather than silently approximated.
        """
        if max_model_len > self.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.sliding_window is not None and self.sliding_window < max_model_len:
            raise ValueError(
                f"sliding-window attention is not supported: the model's sliding_window ({self.sliding_window}) "
                f"is shorter than max_model_len ({max_model_len}); set max_model_len <= {self.sliding_window}"
            )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json`; stop tokens listed in `generation_config.json` are added to `eos_token_ids`."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    generation_path = model_dir / "generation_config.json"
    if generation_path.exists():
        extra = _as_id_list(json.loads(generation_path.read_text()).get("eos_token_id"))
        eos = config.eos_token_ids + [token for token in extra if token not in config.eos_token_ids]
        config = replace(config, eos_token_ids=eos)
    return config


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Accept 5.x `rope_parameters` (theta inside) and 4.x `rope_theta` + `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError("per-layer-type rope parameters are not supported")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type in ("linear", "llama3") and "factor" not in params:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", raw.get("max_position_embeddings")
        ),
    )


def _parse_sliding_window(raw: dict[str, Any]) -> int | None:
    # Qwen2 writes a window size but switches it off with use_sliding_window=false.
    if raw.get("use_sliding_window") is False:
        return None
    return raw.get("sliding_window")
