"""Load a PEFT LoRA adapter directory into validated tensors, or refuse it with a clear reason.

Everything is checked before anything is returned, so a bad adapter is an `InvalidRequestError`
for the one request that named it, never a crash inside a worker or a half-filled slot.

Orientation. Every module is stored as a linear map, `delta(x) = x · Aᵀ · Bᵀ · scaling`, with
`lora_a` [rank, in_features] and `lora_b` [out_features, rank]. For `embed_tokens` the input is the
one-hot token id, so in = vocab_size and out = hidden_size: PEFT's `lora_embedding_A` [r, vocab]
and `lora_embedding_B` [hidden, r] already have that orientation and are kept as they are; the
embedding delta of token t is `A[:, t] · Bᵀ · scaling` (a column lookup instead of a matmul).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from cluster.errors import InvalidRequestError
from lora.adapter_config import AdapterConfig, AdapterProblem
from workers.models.config import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
NEW_EMBEDDINGS_FILE = "new_embeddings.safetensors"
PICKLE_NEW_EMBEDDINGS_FILE = "new_embeddings.bin"

# Projection -> the decoder-layer submodule that holds it.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
EMBEDDING_MODULES = ("embed_tokens", "lm_head")

# PEFT key spellings: with or without the "base_model.model." wrapper prefix and with or without
# an adapter name before ".weight" (".lora_A.default.weight" in an in-memory state dict).
_PREFIX = r"(?:base_model\.model\.)?"
_ADAPTER_NAME = r"(?:\.[\w-]+)?"
_LAYER_KEY = re.compile(
    _PREFIX + rf"(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB]){_ADAPTER_NAME}\.weight"
)
_EMBED_KEY = re.compile(_PREFIX + rf"(?:model\.)?embed_tokens\.lora_embedding_([AB]){_ADAPTER_NAME}")
_LM_HEAD_KEY = re.compile(_PREFIX + rf"lm_head\.lora_([AB]){_ADAPTER_NAME}\.weight")
# PEFT saves a frozen copy of an embedding layer it wraps; LoRA training never changes it.
_FROZEN_COPY_KEY = re.compile(_PREFIX + r"(model\.embed_tokens|lm_head)\.base_layer\.weight")


@dataclass
class LoRAModuleWeights:
    """One targeted base-model projection: delta(x) = x · lora_aᵀ · lora_bᵀ · scaling."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class ExtraVocab:
    """Rows for the tokens an adapter adds: ids vocab_size .. vocab_size + num_tokens - 1.

    `output_embeddings` is None when the adapter gives no lm_head rows for an untied model: the
    added tokens can then be read but never sampled.
    """

    input_embeddings: torch.Tensor  # [num_tokens, hidden_size]
    output_embeddings: torch.Tensor | None  # [num_tokens, hidden_size]

    @property
    def num_tokens(self) -> int:
        return self.input_embeddings.shape[0]


@dataclass
class LoRAAdapter:
    """A validated adapter on CPU in `lora_dtype`, keyed by our module names
    ("layers.{i}.{proj}", "embed_tokens", "lm_head")."""

    name: str
    path: str
    rank: int  # the largest module rank: what a slot must hold
    modules: dict[str, LoRAModuleWeights]
    extra_vocab: ExtraVocab | None = None
    # Long-context adapters were trained with linear rope scaling by this factor (vLLM's rule:
    # ceil(context_length / max_position_embeddings)); None for ordinary adapters.
    long_context_factor: float | None = None

    def num_bytes(self) -> int:
        tensors = [t for weights in self.modules.values() for t in (weights.lora_a, weights.lora_b)]
        if self.extra_vocab is not None:
            tensors += [self.extra_vocab.input_embeddings, self.extra_vocab.output_embeddings]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each LoRA-targetable base module, unsharded.

    `embed_tokens` is (hidden_size, vocab_size): the lookup seen as a linear map of one-hot ids.
    """
    hidden, inter, vocab = model.hidden_size, model.intermediate_size, model.vocab_size
    q_size = model.num_attention_heads * model.head_dim
    kv_size = model.num_key_value_heads * model.head_dim
    return {
        "q_proj": (q_size, hidden),
        "k_proj": (kv_size, hidden),
        "v_proj": (kv_size, hidden),
        "o_proj": (hidden, q_size),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
        "embed_tokens": (hidden, vocab),
        "lm_head": (vocab, hidden),
    }


def peft_module_name(module_key: str) -> str:
    """Our module key -> PEFT's module path in the HF model ("layers.0.q_proj" ->
    "model.layers.0.self_attn.q_proj"), the name target_modules and the patterns match against."""
    if module_key == "lm_head":
        return "lm_head"
    if module_key == "embed_tokens":
        return "model.embed_tokens"
    _, layer, proj = module_key.split(".")
    return f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"


def module_keys(model: ModelConfig) -> list[str]:
    """Every module of `model` an adapter may target, as our keys."""
    layers = [f"layers.{i}.{proj}" for i in range(model.num_hidden_layers) for proj in PROJECTIONS]
    return layers + list(EMBEDDING_MODULES)


def load_adapter(
    path: str,
    name: str,
    model: ModelConfig,
    *,
    max_lora_rank: int,
    lora_dtype: torch.dtype,
    lora_extra_vocab_size: int,
    allowed_roots: list[str] | tuple[str, ...] = (),
    allow_pickle: bool = False,
) -> LoRAAdapter:
    """Read and validate the PEFT adapter at `path` for `model`; tensors are cast to `lora_dtype`
    ("auto" must be resolved by the caller). Raises InvalidRequestError(param="lora_path").

    The error says what is wrong with the adapter but never where a path leads or what
    allowed_lora_roots holds (the client may be anyone with the API key); the operator's log gets
    the path and that detail at WARNING."""
    try:
        directory = _adapter_directory(path, allowed_roots)
        config = AdapterConfig.from_file(_existing_file(directory, CONFIG_FILE, allowed_roots))
        _check_target_modules(config, model)
        tensors = _read_tensors(directory, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE, allowed_roots, allow_pickle)
        if tensors is None:
            raise AdapterProblem(f"it has no {WEIGHTS_FILE}: save it with peft's save_pretrained")
        modules = _build_modules(tensors, config, model, lora_dtype)
        extra_vocab = _load_extra_vocab(
            directory, model, lora_dtype, lora_extra_vocab_size, allowed_roots, allow_pickle
        )
        if not modules and extra_vocab is None:
            raise AdapterProblem(f"{WEIGHTS_FILE} holds no LoRA tensors: save a trained adapter")
        rank = max((weights.rank for weights in modules.values()), default=0)
        if rank > max_lora_rank:
            widest = next(key for key, weights in modules.items() if weights.rank == rank)
            raise AdapterProblem(
                f"its rank {rank} (module {widest}) is above max_lora_rank ({max_lora_rank}): "
                f"start the engine with max_lora_rank >= {rank} (--max-lora-rank {rank})"
            )
    except AdapterProblem as problem:
        detail = f" ({problem.detail})" if problem.detail else ""
        logger.warning("LoRA adapter %r refused, path %r: %s%s", name, path, problem, detail)
        raise InvalidRequestError(f"LoRA adapter {name!r} cannot be served: {problem}", param="lora_path") from None
    factor = None
    if config.context_length is not None and config.context_length > model.max_position_embeddings:
        factor = float(math.ceil(config.context_length / model.max_position_embeddings))
    return LoRAAdapter(
        name=name, path=str(directory), rank=rank, modules=modules, extra_vocab=extra_vocab,
        long_context_factor=factor,
    )


def _adapter_directory(path: str, allowed_roots: list[str] | tuple[str, ...]) -> Path:
    """The real directory (symlinks resolved); the root check comes first so nothing outside is probed."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte, an unknown ~user
        raise AdapterProblem("the path cannot be resolved: give the adapter's directory",
                             detail=f"{type(err).__name__}: {err}") from None
    directory = _inside_roots(resolved, allowed_roots)
    if not directory.exists():
        raise AdapterProblem("the path does not exist: give the directory that holds adapter_config.json")
    if not directory.is_dir():
        raise AdapterProblem("the path is not a directory: give the directory that holds adapter_config.json")
    return directory


def _inside_roots(resolved: Path, allowed_roots: list[str] | tuple[str, ...]) -> Path:
    roots = [Path(root).expanduser().resolve() for root in allowed_roots]
    if roots and not any(resolved.is_relative_to(root) for root in roots):
        raise AdapterProblem(
            "the adapter path is not under an allowed root (allowed_lora_roots): "
            "ask the server's operator where adapters may be loaded from",
            detail=f"it resolves to {resolved}, outside allowed_lora_roots {[str(root) for root in roots]}",
        )
    return resolved


def _existing_file(directory: Path, filename: str, allowed_roots: list[str] | tuple[str, ...]) -> Path:
    file = directory / filename
    if not file.is_file():
        raise AdapterProblem(f"it has no {filename}: save the adapter with peft's save_pretrained")
    return _inside_roots(file.resolve(), allowed_roots)  # a symlinked file may point elsewhere


def _read_tensors(
    directory: Path,
    safe_name: str,
    pickle_name: str,
    allowed_roots: list[str] | tuple[str, ...],
    allow_pickle: bool,
) -> dict[str, torch.Tensor] | None:
    """The tensors of `safe_name`, else of `pickle_name` when pickle is allowed; None if neither exists."""
    if (directory / safe_name).is_file():
        file = _existing_file(directory, safe_name, allowed_roots)
        try:
            return load_file(file, device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise AdapterProblem(f"{safe_name} cannot be read ({_reason(err)}): save the adapter again",
                                 detail=f"{type(err).__name__}: {err}") from None
    if not (directory / pickle_name).is_file():
        return None
    if not allow_pickle:
        raise AdapterProblem(
            f"its weights are only in {pickle_name}, a pickle file that can run code when loaded: convert it "
            "to safetensors, or start the engine with allow_pickle_adapters=true if you trust it"
        )
    file = _existing_file(directory, pickle_name, allowed_roots)
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types for a bad file
        raise AdapterProblem(f"{pickle_name} cannot be read ({_reason(err)}): save the adapter again",
                             detail=f"{type(err).__name__}: {err}") from None
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise AdapterProblem(f"{pickle_name} is not a mapping of names to tensors: save the adapter again")
    return loaded


def _reason(err: Exception) -> str:
    """What a reader's error says, without the file names an OSError carries."""
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if "/" not in text and "\\" not in text else type(err).__name__


def _check_target_modules(config: AdapterConfig, model: ModelConfig) -> None:
    """Refuse target_modules naming modules this model lacks (e.g. GPT-2's "c_attn")."""
    unknown = config.unknown_targets([peft_module_name(key) for key in module_keys(model)])
    if unknown:
        raise AdapterProblem(
            f"target_modules {unknown} are not modules of this {model.model_type} model, which supports "
            f"{', '.join([*PROJECTIONS, *EMBEDDING_MODULES])}: use an adapter trained for this base model"
        )


def _split_key(key: str, model: ModelConfig) -> tuple[str, str] | None:
    """A tensor key -> (our module key, "A" or "B"); None for PEFT's frozen embedding copies."""
    if match := _LAYER_KEY.fullmatch(key):
        layer, parent, proj, side = match.groups()
        if PROJECTIONS.get(proj) != parent:
            raise AdapterProblem(f"tensor {key!r} targets {parent}.{proj}, which this model does not have")
        if int(layer) >= model.num_hidden_layers:
            raise AdapterProblem(
                f"tensor {key!r} targets layer {layer}, but the model has {model.num_hidden_layers} layers: "
                "use an adapter trained for this base model"
            )
        return f"layers.{int(layer)}.{proj}", side
    if match := _EMBED_KEY.fullmatch(key):
        return "embed_tokens", match.group(1)
    if match := _LM_HEAD_KEY.fullmatch(key):
        return "lm_head", match.group(1)
    if _FROZEN_COPY_KEY.fullmatch(key):
        return None
    raise AdapterProblem(
        f"tensor {key!r} is not a LoRA A/B weight, so the adapter cannot be served as plain LoRA: "
        "remove it or merge what it holds into the base model"
    )


def _group_tensors(
    tensors: dict[str, torch.Tensor], model: ModelConfig
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """module key -> {"A": (file key, tensor), "B": ...}; frozen embedding copies are shape-checked and dropped."""
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        parts = _split_key(key, model)
        if parts is None:
            base_shape = (model.vocab_size, model.hidden_size)
            if tuple(tensor.shape) != base_shape:
                raise AdapterProblem(
                    f"tensor {key!r} has shape {tuple(tensor.shape)}, but the base model's is {base_shape}: "
                    f"the adapter changed the vocabulary; add tokens through {NEW_EMBEDDINGS_FILE} instead"
                )
            continue
        module, side = parts
        sides = grouped.setdefault(module, {})
        if side in sides:
            raise AdapterProblem(f"tensors {sides[side][0]!r} and {key!r} are both lora_{side} of {module}")
        sides[side] = (key, tensor)
    return grouped


def _build_modules(
    tensors: dict[str, torch.Tensor], config: AdapterConfig, model: ModelConfig, lora_dtype: torch.dtype
) -> dict[str, LoRAModuleWeights]:
    shapes = expected_shapes(model)
    modules: dict[str, LoRAModuleWeights] = {}
    for module, sides in sorted(_group_tensors(tensors, model).items()):
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise AdapterProblem(f"module {module} has no lora_{missing} tensor: save the adapter again")
        peft_name = peft_module_name(module)
        if not config.targets(peft_name):
            raise AdapterProblem(
                f"it has weights for {peft_name}, which target_modules {config.target_modules!r} does not select: "
                "fix adapter_config.json or remove those tensors"
            )
        lora_a, lora_b = sides["A"][1], sides["B"][1]
        _check_shapes(module, lora_a, lora_b, shapes[module.rsplit(".", 1)[-1]], config.rank_for(peft_name))
        modules[module] = LoRAModuleWeights(
            lora_a=_finite_cast(sides["A"][0], lora_a, lora_dtype),
            lora_b=_finite_cast(sides["B"][0], lora_b, lora_dtype),
            scaling=config.scaling_for(peft_name),
        )
    return modules


def _check_shapes(
    module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, out_in: tuple[int, int], config_rank: int
) -> None:
    out_features, in_features = out_in
    rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
    expected_a, expected_b = (rank, in_features), (out_features, rank)
    if lora_a.dim() != 2 or tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
        raise AdapterProblem(
            f"module {module} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)}, but this base "
            f"model needs lora_A (r, {in_features}) and lora_B ({out_features}, r): "
            "use an adapter trained for this base model"
        )
    if rank != config_rank:
        raise AdapterProblem(
            f"module {module} has rank {rank} in its weights but rank {config_rank} in {CONFIG_FILE} "
            "(r / rank_pattern): the two files do not belong together; save the adapter again"
        )


def _finite_cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, refusing non-float tensors, NaN/inf, and values `dtype` cannot hold."""
    if not tensor.is_floating_point():
        raise AdapterProblem(f"tensor {key!r} has dtype {tensor.dtype}, not a floating-point type")
    if not torch.isfinite(tensor).all():
        raise AdapterProblem(
            f"tensor {key!r} contains NaN or inf values: the training diverged; use a good checkpoint"
        )
    cast = tensor.to(dtype).contiguous()
    if not torch.isfinite(cast).all():
        raise AdapterProblem(
            f"tensor {key!r} has values too large for lora_dtype {dtype}: use a wider lora_dtype (e.g. bfloat16)"
        )
    return cast


def _load_extra_vocab(
    directory: Path,
    model: ModelConfig,
    lora_dtype: torch.dtype,
    lora_extra_vocab_size: int,
    allowed_roots: list[str] | tuple[str, ...],
    allow_pickle: bool,
) -> ExtraVocab | None:
    """Embedding rows of added tokens (vLLM's `new_embeddings` file), if the adapter has them."""
    tensors = _read_tensors(
        directory, NEW_EMBEDDINGS_FILE, PICKLE_NEW_EMBEDDINGS_FILE, allowed_roots, allow_pickle
    )
    if tensors is None:
        return None
    unknown = sorted(set(tensors) - {"input_embeddings", "output_embeddings"})
    if unknown or "input_embeddings" not in tensors:
        raise AdapterProblem(
            f"{NEW_EMBEDDINGS_FILE} must hold input_embeddings and optionally output_embeddings, "
            f"found {sorted(tensors)}: rename or remove the other tensors"
        )
    inputs = tensors["input_embeddings"]
    num_tokens = inputs.shape[0] if inputs.dim() == 2 else -1
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != (num_tokens, model.hidden_size):
            raise AdapterProblem(
                f"{NEW_EMBEDDINGS_FILE}: {key} has shape {tuple(tensor.shape)}, expected "
                f"(n_new_tokens, {model.hidden_size}) with the same n_new_tokens for both tensors"
            )
    if num_tokens == 0:
        return None
    if num_tokens > lora_extra_vocab_size:
        raise AdapterProblem(
            f"it adds {num_tokens} tokens, more than lora_extra_vocab_size ({lora_extra_vocab_size}): "
            f"start the engine with lora_extra_vocab_size >= {num_tokens}"
        )
    input_embeddings = _finite_cast("input_embeddings", inputs, lora_dtype)
    if "output_embeddings" in tensors:
        output_embeddings = _finite_cast("output_embeddings", tensors["output_embeddings"], lora_dtype)
    else:
        output_embeddings = input_embeddings if model.tie_word_embeddings else None
    return ExtraVocab(input_embeddings=input_embeddings, output_embeddings=output_embeddings)
