"""Loading the tokenizer an engine and its server share, or none with `skip_tokenizer_init`.

A model directory without tokenizer files makes transformers fail with a message about backends and
sentencepiece; the operator needs to hear which directory lacks what and the two ways out instead.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.config import ConfigError, EngineConfig
from cluster.errors import InvalidRequestError

# Files one of which every tokenizer transformers can load from a directory has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class TokenizerMissingError(ConfigError):
    """The configured tokenizer cannot be loaded; the message names the directory and the fixes."""


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `config`, or None when the engine runs on token ids only."""
    if config.skip_tokenizer_init:
        return None
    source = config.resolved_tokenizer
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError... depending on what is missing
        which = "tokenizer" if config.tokenizer else "model"
        raise TokenizerMissingError(
            f"cannot load a tokenizer from {source}, the {which} directory ({_why(source, exc)}): put the "
            "tokenizer files (tokenizer.json, tokenizer_config.json) there, "
            "point tokenizer: (--tokenizer PATH) at a directory that has them, or set skip_tokenizer_init: true "
            "(--skip-tokenizer-init) to serve token ids in and out without a tokenizer"
        ) from exc


def require_tokenizer(
    tokenizer: PreTrainedTokenizerBase | None, what: str, param: str, fix: str
) -> PreTrainedTokenizerBase:
    """`tokenizer`, or a 400 saying `what` needs one when the engine runs on token ids only."""
    if tokenizer is None:
        raise InvalidRequestError(
            f"{what} need a tokenizer, and this server runs without one (skip_tokenizer_init): {fix}", param=param
        )
    return tokenizer


def _why(source: str, exc: BaseException) -> str:
    """What is wrong in words: transformers' own message for a lacking directory talks of backends."""
    directory = Path(source).expanduser()
    if not directory.exists():
        return "it does not exist"
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        return f"it has none of {', '.join(TOKENIZER_FILES)}"
    detail = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {detail[:300]}"
