"""Describe a PEFT LoRA adapter directory (the driver) or load it into validated tensors (a
worker), or refuse it with a clear reason.

The driver's description reads adapter_config.json and the tensor files' headers only: names,
shapes, dtypes, added tokens, trained context. A worker's load makes the same checks on what it
reads, then checks the values. Everything is checked before anything is returned, so a bad adapter
is an `InvalidRequestError` for the one request that named it, never a crash inside a worker or a
half-filled slot.

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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from cluster.errors import InvalidRequestError
from lora.adapter_config import AdapterConfig, AdapterProblem
from lora.tensor_files import TensorFile, TensorSpec, specs_of
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


@dataclass(frozen=True)
class AdapterDescription:
    """What the driver knows of an adapter it accepted: read from its config and its files' headers;
    its values stay on disk until the workers load them."""

    name: str
    path: str  # the real directory
    rank: int  # the largest module rank
    extra_tokens: int = 0  # tokens it adds, ids from the base vocabulary size on
    long_context_factor: float | None = None  # as LoRAAdapter's


@dataclass(frozen=True)
class _ModulePlan:
    """One module's tensors in the weights file, checked by name, shape and dtype."""

    a_key: str
    b_key: str
    rank: int
    scaling: float


_Stored = TypeVar("_Stored", TensorSpec, torch.Tensor)


@dataclass(frozen=True)
class _Survey(Generic[_Stored]):
    """An adapter's tensor files as read (headers or tensors) and what the checks made of them."""

    modules: dict[str, _ModulePlan]
    rank: int
    extra_tokens: int
    weights: dict[str, _Stored]
    new_embeddings: dict[str, _Stored] | None


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


def describe_adapter(
    path: str,
    name: str,
    model: ModelConfig,
    *,
    max_lora_rank: int,
    lora_extra_vocab_size: int,
    allowed_roots: list[str] | tuple[str, ...] = (),
    allow_pickle: bool = False,
) -> AdapterDescription:
    """Check the PEFT adapter at `path` for `model` from adapter_config.json and its tensor files'
    headers: every check `load_adapter` makes but those that need values (NaN/inf, range of
    lora_dtype). Raises InvalidRequestError(param="lora_path") as `load_adapter` does."""
    with _refusals(name, path):
        directory, config = _open(path, model, allowed_roots)
        survey = _survey(directory, config, model, TensorFile.read_specs, lambda specs: specs,
                         max_lora_rank, lora_extra_vocab_size, allowed_roots, allow_pickle)
    return AdapterDescription(
        name=name, path=str(directory), rank=survey.rank, extra_tokens=survey.extra_tokens,
        long_context_factor=_long_context_factor(config, model),
    )


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

    Each file is read once; the checks of `describe_adapter` run on what was read (the files may
    have changed since the driver described them), then the values are checked.

    The error says what is wrong with the adapter but never where a path leads or what
    allowed_lora_roots holds (the client may be anyone with the API key); the operator's log gets
    the path and that detail at WARNING."""
    with _refusals(name, path):
        directory, config = _open(path, model, allowed_roots)
        survey = _survey(directory, config, model, TensorFile.read_tensors, specs_of,
                         max_lora_rank, lora_extra_vocab_size, allowed_roots, allow_pickle)
        keys = [key for plan in survey.modules.values() for key in (plan.a_key, plan.b_key)]
        cast = _finite_casts({key: survey.weights[key] for key in keys}, lora_dtype)
        modules = {
            key: LoRAModuleWeights(lora_a=cast[plan.a_key], lora_b=cast[plan.b_key], scaling=plan.scaling)
            for key, plan in survey.modules.items()
        }
        extra_vocab = _extra_vocab(survey.new_embeddings, model, lora_dtype) if survey.extra_tokens else None
    return LoRAAdapter(
        name=name, path=str(directory), rank=survey.rank, modules=modules, extra_vocab=extra_vocab,
        long_context_factor=_long_context_factor(config, model),
    )


@contextmanager
def _refusals(name: str, path: str) -> Iterator[None]:
    """An AdapterProblem as the client's InvalidRequestError, its path and detail for the log only."""
    try:
        yield
    except AdapterProblem as problem:
        detail = f" ({problem.detail})" if problem.detail else ""
        logger.warning("LoRA adapter %r refused, path %r: %s%s", name, path, problem, detail)
        raise InvalidRequestError(f"LoRA adapter {name!r} cannot be served: {problem}", param="lora_path") from None


def _open(path: str, model: ModelConfig, allowed_roots: list[str] | tuple[str, ...]) -> tuple[Path, AdapterConfig]:
    """The adapter's real directory and its checked adapter_config.json."""
    directory = _adapter_directory(path, allowed_roots)
    config = AdapterConfig.from_file(_existing_file(directory, CONFIG_FILE, allowed_roots))
    _check_target_modules(config, model)
    return directory, config


def _long_context_factor(config: AdapterConfig, model: ModelConfig) -> float | None:
    if config.context_length is None or config.context_length <= model.max_position_embeddings:
        return None
    return float(math.ceil(config.context_length / model.max_position_embeddings))


def _survey(
    directory: Path,
    config: AdapterConfig,
    model: ModelConfig,
    read: Callable[[TensorFile], dict[str, _Stored]],
    specs: Callable[[dict[str, _Stored]], dict[str, TensorSpec]],
    max_lora_rank: int,
    lora_extra_vocab_size: int,
    allowed_roots: list[str] | tuple[str, ...],
    allow_pickle: bool,
) -> _Survey[_Stored]:
    """Read the tensor files with `read` (headers or whole tensors) and check what `specs` makes
    of them, in the order a reader meets the problems."""
    weights_file = _tensor_file(directory, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE, allowed_roots, allow_pickle)
    if weights_file is None:
        raise AdapterProblem(f"it has no {WEIGHTS_FILE}: save it with peft's save_pretrained")
    weights = read(weights_file)
    modules = _check_modules(specs(weights), config, model)
    embeddings_file = _tensor_file(
        directory, NEW_EMBEDDINGS_FILE, PICKLE_NEW_EMBEDDINGS_FILE, allowed_roots, allow_pickle
    )
    new_embeddings = read(embeddings_file) if embeddings_file is not None else None
    extra_tokens = _check_extra_vocab(
        specs(new_embeddings) if new_embeddings is not None else None, model, lora_extra_vocab_size
    )
    if not modules and not extra_tokens:
        raise AdapterProblem(f"{WEIGHTS_FILE} holds no LoRA tensors: save a trained adapter")
    rank = max((plan.rank for plan in modules.values()), default=0)
    if rank > max_lora_rank:
        widest = next(key for key, plan in modules.items() if plan.rank == rank)
        raise AdapterProblem(
            f"its rank {rank} (module {widest}) is above max_lora_rank ({max_lora_rank}): "
            f"start the engine with max_lora_rank >= {rank} (--max-lora-rank {rank})"
        )
    return _Survey(modules, rank, extra_tokens, weights, new_embeddings)


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


def _tensor_file(
    directory: Path,
    safe_name: str,
    pickle_name: str,
    allowed_roots: list[str] | tuple[str, ...],
    allow_pickle: bool,
) -> TensorFile | None:
    """`safe_name`, else `pickle_name` when pickle is allowed; None if neither exists."""
    if (directory / safe_name).is_file():
        return TensorFile(_existing_file(directory, safe_name, allowed_roots), pickled=False)
    if not (directory / pickle_name).is_file():
        return None
    if not allow_pickle:
        raise AdapterProblem(
            f"its weights are only in {pickle_name}, a pickle file that can run code when loaded: convert it "
            "to safetensors, or start the engine with allow_pickle_adapters=true if you trust it"
        )
    return TensorFile(_existing_file(directory, pickle_name, allowed_roots), pickled=True)


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
    specs: dict[str, TensorSpec], model: ModelConfig
) -> dict[str, dict[str, tuple[str, TensorSpec]]]:
    """module key -> {"A": (file key, spec), "B": ...}; frozen embedding copies are shape-checked and dropped."""
    grouped: dict[str, dict[str, tuple[str, TensorSpec]]] = {}
    for key, spec in specs.items():
        parts = _split_key(key, model)
        if parts is None:
            base_shape = (model.vocab_size, model.hidden_size)
            if spec.shape != base_shape:
                raise AdapterProblem(
                    f"tensor {key!r} has shape {spec.shape}, but the base model's is {base_shape}: "
                    f"the adapter changed the vocabulary; add tokens through {NEW_EMBEDDINGS_FILE} instead"
                )
            continue
        module, side = parts
        sides = grouped.setdefault(module, {})
        if side in sides:
            raise AdapterProblem(f"tensors {sides[side][0]!r} and {key!r} are both lora_{side} of {module}")
        sides[side] = (key, spec)
    return grouped


def _check_modules(
    specs: dict[str, TensorSpec], config: AdapterConfig, model: ModelConfig
) -> dict[str, _ModulePlan]:
    """Every module's A/B pair, by module key in sorted order, checked against the model and the config."""
    shapes = expected_shapes(model)
    modules: dict[str, _ModulePlan] = {}
    for module, sides in sorted(_group_tensors(specs, model).items()):
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise AdapterProblem(f"module {module} has no lora_{missing} tensor: save the adapter again")
        peft_name = peft_module_name(module)
        if not config.targets(peft_name):
            raise AdapterProblem(
                f"it has weights for {peft_name}, which target_modules {config.target_modules!r} does not select: "
                "fix adapter_config.json or remove those tensors"
            )
        (a_key, lora_a), (b_key, lora_b) = sides["A"], sides["B"]
        _check_shapes(module, lora_a, lora_b, shapes[module.rsplit(".", 1)[-1]], config.rank_for(peft_name))
        _check_float(a_key, lora_a)
        _check_float(b_key, lora_b)
        modules[module] = _ModulePlan(a_key, b_key, lora_a.shape[0], config.scaling_for(peft_name))
    return modules


def _check_shapes(
    module: str, lora_a: TensorSpec, lora_b: TensorSpec, out_in: tuple[int, int], config_rank: int
) -> None:
    out_features, in_features = out_in
    rank = lora_a.shape[0] if len(lora_a.shape) == 2 else -1
    expected_a, expected_b = (rank, in_features), (out_features, rank)
    if len(lora_a.shape) != 2 or lora_a.shape != expected_a or lora_b.shape != expected_b:
        raise AdapterProblem(
            f"module {module} has lora_A {lora_a.shape} and lora_B {lora_b.shape}, but this base "
            f"model needs lora_A (r, {in_features}) and lora_B ({out_features}, r): "
            "use an adapter trained for this base model"
        )
    if rank != config_rank:
        raise AdapterProblem(
            f"module {module} has rank {rank} in its weights but rank {config_rank} in {CONFIG_FILE} "
            "(r / rank_pattern): the two files do not belong together; save the adapter again"
        )


def _check_float(key: str, spec: TensorSpec) -> None:
    """Only a floating-point tensor casts to lora_dtype; its values are the workers' to check."""
    if not spec.is_floating_point:
        raise AdapterProblem(f"tensor {key!r} has dtype {spec.dtype}, not a floating-point type")


def _finite_cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, refusing NaN/inf and values `dtype` cannot hold."""
    return _finite_casts({key: tensor}, dtype)[key]


def _finite_casts(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor in `dtype`, refusing NaN/inf and values `dtype` cannot hold, the first such
    tensor named. The checks were half of an adapter's read, which a worker does inside a step when
    the adapter is not in its CPU cache; a cast that cannot overflow is not checked again."""
    if not _all_finite(tensors.values()):
        key = next(key for key, tensor in tensors.items() if not _all_finite([tensor]))
        raise AdapterProblem(
            f"tensor {key!r} contains NaN or inf values: the training diverged; use a good checkpoint"
        )
    cast = {key: tensor.to(dtype).contiguous() for key, tensor in tensors.items()}
    narrowed = {key: cast[key] for key, tensor in tensors.items() if _narrows(tensor.dtype, dtype)}
    if not _all_finite(narrowed.values()):
        key = next(key for key, tensor in narrowed.items() if not _all_finite([tensor]))
        raise AdapterProblem(
            f"tensor {key!r} has values too large for lora_dtype {dtype}: use a wider lora_dtype (e.g. bfloat16)"
        )
    return cast


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no value is NaN or ±inf: each tensor's min and max (NaN propagates through both),
    one vectorized pass, where `isfinite().all()` takes two and a mask per tensor."""
    extremes = [torch.stack(torch.aminmax(tensor)).double() for tensor in tensors if tensor.numel()]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


def _narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether a finite `source` value can overflow to inf in `target`."""
    return torch.finfo(target).max < torch.finfo(source).max


def _check_extra_vocab(
    specs: dict[str, TensorSpec] | None, model: ModelConfig, lora_extra_vocab_size: int
) -> int:
    """How many tokens the adapter adds (vLLM's `new_embeddings` file), 0 without that file."""
    if specs is None:
        return 0
    unknown = sorted(set(specs) - {"input_embeddings", "output_embeddings"})
    if unknown or "input_embeddings" not in specs:
        raise AdapterProblem(
            f"{NEW_EMBEDDINGS_FILE} must hold input_embeddings and optionally output_embeddings, "
            f"found {sorted(specs)}: rename or remove the other tensors"
        )
    inputs = specs["input_embeddings"]
    num_tokens = inputs.shape[0] if len(inputs.shape) == 2 else -1
    for key, spec in specs.items():
        if spec.shape != (num_tokens, model.hidden_size):
            raise AdapterProblem(
                f"{NEW_EMBEDDINGS_FILE}: {key} has shape {spec.shape}, expected "
                f"(n_new_tokens, {model.hidden_size}) with the same n_new_tokens for both tensors"
            )
    if num_tokens == 0:
        return 0
    if num_tokens > lora_extra_vocab_size:
        raise AdapterProblem(
            f"it adds {num_tokens} tokens, more than lora_extra_vocab_size ({lora_extra_vocab_size}): "
            f"start the engine with lora_extra_vocab_size >= {num_tokens}"
        )
    for key in ("input_embeddings", "output_embeddings"):
        if key in specs:
            _check_float(key, specs[key])
    return num_tokens


def _extra_vocab(tensors: dict[str, torch.Tensor] | None, model: ModelConfig, lora_dtype: torch.dtype) -> ExtraVocab:
    """The rows of the added tokens (already checked by `_check_extra_vocab`), in `lora_dtype`."""
    assert tensors is not None
    input_embeddings = _finite_cast("input_embeddings", tensors["input_embeddings"], lora_dtype)
    if "output_embeddings" in tensors:
        output_embeddings = _finite_cast("output_embeddings", tensors["output_embeddings"], lora_dtype)
    else:
        output_embeddings = input_embeddings if model.tie_word_embeddings else None
    return ExtraVocab(input_embeddings=input_embeddings, output_embeddings=output_embeddings)
