"""A PEFT LoRA adapter's `adapter_config.json`: which modules it targets and how each one is scaled.

Only plain LoRA is served. Every PEFT option that changes what the adapter computes at inference
(DoRA, trained biases, replaced modules, ...) is refused here, because applying such an adapter as
plain LoRA would silently give different outputs than PEFT does.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# LoraConfig's defaults, for configs that leave these keys out.
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8

# Options whose truthy value changes the computation: (key, what it means, how to fix it).
_UNSUPPORTED_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("use_dora", "DoRA", "merge it into the base model or train a plain LoRA adapter"),
    ("modules_to_save", "fully trained replacement modules", "merge them into the base model"),
    ("fan_in_fan_out", "transposed (Conv1D-style) weights", "save it with fan_in_fan_out=false"),
    ("lora_bias", "a bias on LoRA B", "train it with lora_bias=false"),
    ("layer_replication", "replicated layers", "merge it into the base model"),
    ("target_parameters", "LoRA on raw parameters", "target nn.Linear modules instead"),
    ("trainable_token_indices", "trained token embeddings", "merge them into the base model"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)", "train a plain LoRA adapter"),
    ("use_qalora", "QALoRA input pooling", "train a plain LoRA adapter"),
    ("kasa_config", "KaSA singular-value adaptation", "train a plain LoRA adapter"),
    ("monteclora_config", "MonteCLoRA sampling", "train a plain LoRA adapter"),
    ("use_bdlora", "block-diagonal BD-LoRA", "train a plain LoRA adapter"),
    ("arrow_config", "Arrow routing", "load a single plain LoRA adapter"),
)


class AdapterProblem(ValueError):
    """What is wrong with an adapter and how to fix it, fit for the client; `load_adapter` prefixes the
    adapter's name. `detail` is for the operator's log only: resolved paths, roots, reader errors."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class AdapterConfig:
    """The settings of a LoRA `adapter_config.json` that matter for serving it.

    Module names here are PEFT's: the base model's module path, e.g.
    "model.layers.0.self_attn.q_proj", "model.embed_tokens", "lm_head".
    """

    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()  # name suffixes, one regex, or "all-linear"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    context_length: int | None = None  # long-context (LongLoRA) adapters: the context they were trained for

    @classmethod
    def from_file(cls, path: Path) -> AdapterConfig:
        try:
            raw = json.loads(path.read_text())
        except OSError as err:  # its message names the file's full path: the log gets it, the client not
            raise AdapterProblem(
                f"cannot read {path.name} ({err.strerror or type(err).__name__}): write it with peft's save_pretrained",
                detail=str(err),
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterProblem(
                f"cannot read {path.name} ({err}): write it with peft's save_pretrained"
            ) from None
        if not isinstance(raw, dict):
            raise AdapterProblem(f"{path.name} is not a JSON object: write it with peft's save_pretrained")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        peft_type = raw.get("peft_type")
        if peft_type != "LORA":
            raise AdapterProblem(f"peft_type is {peft_type!r}, but only LORA adapters can be served")
        for key, feature, fix in _UNSUPPORTED_OPTIONS:
            if raw.get(key):
                raise AdapterProblem(
                    f"it uses {feature} ({key}: {raw[key]!r}), which is not supported: {fix}"
                )
        bias = raw.get("bias", "none")
        if bias != "none":
            raise AdapterProblem(
                f"it trains base-model biases (bias: {bias!r}), which is not supported: train it with bias='none'"
            )
        targets = raw.get("target_modules") or ()
        config = cls(
            rank=raw.get("r", DEFAULT_RANK),
            alpha=raw.get("lora_alpha", DEFAULT_ALPHA),
            use_rslora=bool(raw.get("use_rslora", False)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            context_length=raw.get("context_length"),
        )
        config._check_values()
        return config

    def _check_values(self) -> None:
        if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 1):
            raise AdapterProblem(f"context_length is {self.context_length!r}, not a positive integer: fix adapter_config.json")
        ranks = {"r": self.rank} | {
            f"rank_pattern[{key!r}]": value for key, value in self.rank_pattern.items()
        }
        for where, rank in ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise AdapterProblem(f"{where} is {rank!r}, not a positive integer: fix adapter_config.json")
        alphas = {"lora_alpha": self.alpha} | {
            f"alpha_pattern[{key!r}]": value for key, value in self.alpha_pattern.items()
        }
        for where, alpha in alphas.items():
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
                raise AdapterProblem(f"{where} is {alpha!r}, not a finite number: fix adapter_config.json")
        regexes = [*self.rank_pattern, *self.alpha_pattern]
        if isinstance(self.target_modules, str):
            regexes.append(self.target_modules)
        elif not all(isinstance(target, str) for target in self.target_modules):
            raise AdapterProblem(
                f"target_modules {list(self.target_modules)!r} must be module names: fix adapter_config.json"
            )
        for regex in regexes:
            try:
                re.compile(regex)
            except re.error as err:
                raise AdapterProblem(
                    f"{regex!r} in adapter_config.json is not a valid regex ({err})"
                ) from None

    def targets(self, module_name: str) -> bool:
        """Whether `target_modules` selects `module_name`, by PEFT's rules: a list entry matches the
        name or a dotted suffix of it, a string is a regex for the whole name; "all-linear" is every
        linear layer but the output layer. A config without target_modules lets the weights decide."""
        if not self.target_modules:
            return True
        if self.target_modules == "all-linear":
            return module_name not in ("lm_head", "model.embed_tokens")
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(_is_dotted_suffix(target, module_name) for target in self.target_modules)

    def unknown_targets(self, module_names: list[str]) -> list[str]:
        """The target_modules entries (or the regex) that select none of `module_names`."""
        if isinstance(self.target_modules, str):
            return [] if any(self.targets(name) for name in module_names) else [self.target_modules]
        return [
            target
            for target in self.target_modules
            if not any(_is_dotted_suffix(target, name) for name in module_names)
        ]

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.rank))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling_for(self, module_name: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA, after rank_pattern and alpha_pattern."""
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _is_dotted_suffix(suffix: str, module_name: str) -> bool:
    return module_name == suffix or module_name.endswith("." + suffix)


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first key (in file order) that matches the end of `module_name` after a dot
    boundary, the key read as a regex; this is how PEFT resolves rank_pattern and alpha_pattern."""
    for key, value in pattern.items():
        if re.match(rf"(?:.*\.)?(?:{key})$", module_name):
            return value
    return default
