"""Adapter loading against adapters written by real peft: tensors, scaling, dtype, and every refusal;
the driver's description of an adapter from its config and file headers alone."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from cluster.errors import InvalidRequestError
from lora import tensor_files
from lora.adapter import AdapterDescription, LoRAAdapter, describe_adapter, expected_shapes, load_adapter
from tests.adapters import edit_adapter_config, load_peft_model, make_peft_adapter, write_new_embeddings
from tests.checkpoints import make_random_checkpoint
from workers.models.config import ModelConfig, load_model_config

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATTERNS = {
    "rank_pattern": {"down_proj": 6, "layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"^model.layers.0.self_attn.q_proj": 3, r"mlp\.(up|down)_proj": 5},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def model(base_dir: Path) -> ModelConfig:
    return load_model_config(base_dir)


@pytest.fixture(scope="module")
def good_adapter(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rank 4, alpha 8, on q/v/down and both embedding layers (so peft also saves frozen embedding copies)."""
    out = tmp_path_factory.mktemp("good") / "adapter"
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
    return make_peft_adapter(base_dir, out, rank=4, alpha=8, target_modules=targets)


@pytest.fixture
def adapter_copy(good_adapter: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def load(path: Path | str, model: ModelConfig, **options) -> LoRAAdapter:
    settings = {"max_lora_rank": 16, "lora_dtype": torch.float32, "lora_extra_vocab_size": 8} | options
    return load_adapter(str(path), "pirate", model, **settings)


def edit_tensors(adapter_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_loads_tensors_shapes_and_scaling(good_adapter: Path, model: ModelConfig) -> None:
    adapter = load(good_adapter, model)
    layers = {f"layers.{i}.{proj}" for i in range(2) for proj in ("q_proj", "v_proj", "down_proj")}
    assert set(adapter.modules) == layers | {"embed_tokens", "lm_head"}
    assert adapter.rank == 4 and adapter.extra_vocab is None
    shapes = expected_shapes(model)
    for key, weights in adapter.modules.items():
        out_features, in_features = shapes[key.rsplit(".", 1)[-1]]
        assert weights.lora_a.shape == (4, in_features) and weights.lora_b.shape == (out_features, 4)
        assert weights.scaling == 2.0 and weights.lora_a.dtype == torch.float32
    assert shapes["embed_tokens"] == (64, 256) and shapes["k_proj"] == (32, 64)
    assert adapter.num_bytes() == sum(
        4 * (w.lora_a.numel() + w.lora_b.numel()) for w in adapter.modules.values()
    )


def test_casts_to_lora_dtype(good_adapter: Path, model: ModelConfig) -> None:
    reference = load(good_adapter, model).modules["layers.0.q_proj"].lora_a
    adapter = load(good_adapter, model, lora_dtype=torch.bfloat16)
    assert all(w.lora_a.dtype == w.lora_b.dtype == torch.bfloat16 for w in adapter.modules.values())
    torch.testing.assert_close(
        adapter.modules["layers.0.q_proj"].lora_a.float(), reference, rtol=1e-2, atol=1e-3
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_scaling_match_peft(
    base_dir: Path, model: ModelConfig, tmp_path: Path, use_rslora: bool
) -> None:
    adapter_dir = make_peft_adapter(
        base_dir, tmp_path, rank=4, alpha=8, target_modules=ALL_PROJECTIONS, use_rslora=use_rslora, **PATTERNS
    )
    adapter = load(adapter_dir, model)
    reference = load_peft_model(base_dir, adapter_dir)
    prefix = "base_model.model.model."
    compared = 0
    for name, module in reference.named_modules():
        if name.startswith(prefix + "layers.") and hasattr(module, "lora_A"):
            _, layer, _, proj = name.removeprefix(prefix).split(".")
            weights = adapter.modules[f"layers.{layer}.{proj}"]
            assert weights.rank == module.r["default"]
            assert weights.scaling == pytest.approx(module.scaling["default"])
            compared += 1
    assert compared == 14 and adapter.rank == 6
    q0 = adapter.modules["layers.0.q_proj"]
    assert q0.scaling == pytest.approx(3 / math.sqrt(4) if use_rslora else 3 / 4)


def test_weights_reproduce_peft_deltas(base_dir: Path, good_adapter: Path, model: ModelConfig) -> None:
    adapter = load(good_adapter, model)
    peft_model = load_peft_model(base_dir, good_adapter).base_model.model
    torch.manual_seed(0)
    x = torch.randn(5, model.hidden_size)
    linear_layers = {
        "layers.1.q_proj": (peft_model.model.layers[1].self_attn.q_proj, x),
        "layers.0.down_proj": (
            peft_model.model.layers[0].mlp.down_proj,
            torch.randn(5, model.intermediate_size),
        ),
        "lm_head": (peft_model.lm_head, x),
    }
    with torch.no_grad():
        for key, (layer, inputs) in linear_layers.items():
            weights = adapter.modules[key]
            ours = inputs @ weights.lora_a.T @ weights.lora_b.T * weights.scaling
            torch.testing.assert_close(ours, layer(inputs) - layer.base_layer(inputs), rtol=1e-4, atol=1e-5)
        ids = torch.tensor([0, 7, 255, 7])
        embed = peft_model.model.embed_tokens
        weights = adapter.modules["embed_tokens"]
        ours = weights.lora_a[:, ids].T @ weights.lora_b.T * weights.scaling
        torch.testing.assert_close(ours, embed(ids) - embed.base_layer(ids), rtol=1e-4, atol=1e-5)


def test_tolerates_peft_key_spellings(adapter_copy: Path, good_adapter: Path, model: ModelConfig) -> None:
    def respell(tensors: dict[str, torch.Tensor]) -> None:
        """Drop the wrapper prefix and name the adapter: "model.layers.0....lora_A.default.weight"."""
        for key in list(tensors):
            new_key = re.sub(r"(lora_(?:embedding_)?[AB])(\.weight)?$", r"\1.default\2", key)
            tensors[new_key.removeprefix("base_model.model.")] = tensors.pop(key)

    edit_tensors(adapter_copy, respell)
    assert any(".default" in key for key in load_file(adapter_copy / "adapter_model.safetensors"))
    expected, adapter = load(good_adapter, model), load(adapter_copy, model)
    assert set(adapter.modules) == set(expected.modules)
    for key, weights in adapter.modules.items():
        assert torch.equal(weights.lora_b, expected.modules[key].lora_b)


def test_pickle_weights_need_opt_in(base_dir: Path, model: ModelConfig, tmp_path: Path) -> None:
    adapter_dir = make_peft_adapter(base_dir, tmp_path, rank=4, alpha=8, safe_serialization=False)
    assert not (adapter_dir / "adapter_model.safetensors").exists()
    with pytest.raises(InvalidRequestError, match="allow_pickle_adapters"):
        load(adapter_dir, model)
    assert load(adapter_dir, model, allow_pickle=True).modules["layers.0.q_proj"].rank == 4


def _set_value(key_part: str, value: float) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        def poke(tensors: dict[str, torch.Tensor]) -> None:
            key = next(k for k in tensors if key_part in k)
            tensors[key][0, 0] = value

        edit_tensors(adapter_dir, poke)

    return edit


def _add_tensor(adapter_dir: Path) -> None:
    edit_tensors(
        adapter_dir, lambda tensors: tensors.update({"base_model.model.model.norm.weight": torch.ones(64)})
    )


def _drop_tensor(adapter_dir: Path) -> None:
    edit_tensors(
        adapter_dir,
        lambda tensors: tensors.pop("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
    )


REFUSALS: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{"), "cannot read adapter_config.json"),
    "not lora": (lambda d: edit_adapter_config(d, peft_type="LOHA"), "only LORA"),
    "dora": (lambda d: edit_adapter_config(d, use_dora=True), "DoRA"),
    "bias": (lambda d: edit_adapter_config(d, bias="lora_only"), "bias='none'"),
    "modules_to_save": (lambda d: edit_adapter_config(d, modules_to_save=["score"]), "modules_to_save"),
    "fan_in_fan_out": (lambda d: edit_adapter_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "unknown target": (lambda d: edit_adapter_config(d, target_modules=["q_proj", "c_attn"]), "['c_attn']"),
    "untargeted weights": (lambda d: edit_adapter_config(d, target_modules=["q_proj"]), "does not select"),
    "config rank": (lambda d: edit_adapter_config(d, r=8), "rank 4 in its weights but rank 8"),
    "unknown regex target": (lambda d: edit_adapter_config(d, target_modules=r".*\.c_attn"), "c_attn"),
    "bad pattern": (lambda d: edit_adapter_config(d, rank_pattern={"(": 2}), "not a valid regex"),
    "nan": (_set_value("q_proj.lora_A", math.nan), "NaN or inf"),
    "inf": (_set_value("lora_embedding_B", math.inf), "NaN or inf"),
    "extra key": (_add_tensor, "model.norm.weight' is not a LoRA A/B weight"),
    "half module": (_drop_tensor, "layers.0.down_proj has no lora_B"),
    "too many tokens": (lambda d: write_new_embeddings(d, 9, 64), "more than lora_extra_vocab_size (8)"),
    "token shape": (lambda d: write_new_embeddings(d, 2, 32), "expected (n_new_tokens, 64)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_bad_adapters(adapter_copy: Path, model: ModelConfig, case: str) -> None:
    damage, message = REFUSALS[case]
    damage(adapter_copy)
    with pytest.raises(InvalidRequestError, match="LoRA adapter 'pirate'") as info:
        load(adapter_copy, model)
    assert message in info.value.message and info.value.param == "lora_path"


def test_refuses_missing_or_non_directory_path(good_adapter: Path, model: ModelConfig) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load(good_adapter / "nope", model)
    with pytest.raises(InvalidRequestError, match="not a directory"):
        load(good_adapter / "adapter_config.json", model)


def test_refuses_rank_above_max_lora_rank(good_adapter: Path, model: ModelConfig) -> None:
    with pytest.raises(InvalidRequestError, match=r"rank 4 .* above max_lora_rank \(2\).*--max-lora-rank 4"):
        load(good_adapter, model, max_lora_rank=2)


def test_refuses_shapes_of_another_base_model(good_adapter: Path, model: ModelConfig) -> None:
    wider = replace(model, intermediate_size=96)
    with pytest.raises(InvalidRequestError, match=r"down_proj has lora_A \(4, 128\).*lora_A \(r, 96\)"):
        load(good_adapter, wider)
    with pytest.raises(InvalidRequestError, match="targets layer 1, but the model has 1 layers"):
        load(good_adapter, replace(model, num_hidden_layers=1))


def test_refuses_values_that_overflow_lora_dtype(adapter_copy: Path, model: ModelConfig) -> None:
    _set_value("q_proj.lora_B", 1e6)(adapter_copy)
    assert load(adapter_copy, model).modules["layers.0.q_proj"].lora_b[0, 0] == 1e6
    with pytest.raises(InvalidRequestError, match="too large for lora_dtype torch.float16"):
        load(adapter_copy, model, lora_dtype=torch.float16)


def test_extra_vocab(adapter_copy: Path, model: ModelConfig) -> None:
    write_new_embeddings(adapter_copy, 3, 64)
    extra = load(adapter_copy, model).extra_vocab
    assert extra is not None and extra.num_tokens == 3 and extra.output_embeddings.shape == (3, 64)
    write_new_embeddings(adapter_copy, 3, 64, with_output=False)
    assert load(adapter_copy, model).extra_vocab.output_embeddings is None
    tied = load(adapter_copy, replace(model, tie_word_embeddings=True)).extra_vocab
    assert tied.output_embeddings is tied.input_embeddings


def test_allowed_roots_resolve_symlinks(good_adapter: Path, model: ModelConfig, tmp_path: Path) -> None:
    root = tmp_path / "root"
    inside = Path(shutil.copytree(good_adapter, root / "inside"))
    assert load(inside, model, allowed_roots=[str(root)]).path == str(inside.resolve())
    (root / "escape").symlink_to(good_adapter, target_is_directory=True)
    with pytest.raises(InvalidRequestError, match="not under an allowed root"):
        load(root / "escape", model, allowed_roots=[str(root)])
    with pytest.raises(InvalidRequestError, match="not under an allowed root"):
        load(good_adapter, model, allowed_roots=[str(root)])
    weights = inside / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(good_adapter / "adapter_model.safetensors")
    with pytest.raises(InvalidRequestError, match="not under an allowed root"):
        load(inside, model, allowed_roots=[str(root)])
    assert load(inside, model).rank == 4  # without roots, a symlinked file is fine


def test_refusals_keep_paths_for_the_operators_log(
    good_adapter: Path, model: ModelConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's message says what is wrong, never where a path leads or what the roots are;
    the WARNING log has both, with the adapter's name."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(good_adapter, target_is_directory=True)
    with caplog.at_level("WARNING", logger="lora.adapter"), pytest.raises(InvalidRequestError) as info:
        load(root / "escape", model, allowed_roots=[str(root)])
    assert str(tmp_path) not in info.value.message and str(good_adapter) not in info.value.message
    logged = caplog.text
    assert "'pirate'" in logged and str(good_adapter.resolve()) in logged and str(root) in logged
    (tmp_path / "broken" / "adapter_config.json").mkdir(parents=True)  # a directory, not a file
    with pytest.raises(InvalidRequestError) as info:
        load(tmp_path / "broken", model)
    assert str(tmp_path) not in info.value.message and "/" not in info.value.message.split(":", 1)[1]


# ---- describing an adapter from its config and file headers (the driver) ------------------------


def describe(path: Path | str, model: ModelConfig, **options) -> AdapterDescription:
    settings = {"max_lora_rank": 16, "lora_extra_vocab_size": 8} | options
    return describe_adapter(str(path), "pirate", model, **settings)


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to read tensor values raises; safetensors' header reader is watched for get_tensor
    and slice indexing. Returns the reads attempted (none expected)."""
    attempts: list[str] = []
    real_safe_open = tensor_files.safe_open

    def refuse(what: str) -> Callable[..., None]:
        def read(*args, **kwargs) -> None:
            attempts.append(what)
            raise AssertionError(f"{what} read tensor data")
        return read

    class WatchedSlice:
        def __init__(self, view) -> None:
            self.view = view

        def get_shape(self):
            return self.view.get_shape()

        def get_dtype(self):
            return self.view.get_dtype()

        __getitem__ = refuse("a slice")

    class WatchedHeader:
        def __init__(self, *args, **kwargs) -> None:
            self.opened = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.header = self.opened.__enter__()
            return self

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

        def keys(self):
            return self.header.keys()

        def get_slice(self, key):
            return WatchedSlice(self.header.get_slice(key))

        get_tensor = refuse("get_tensor")

    monkeypatch.setattr(tensor_files, "safe_open", WatchedHeader)
    monkeypatch.setattr(tensor_files, "load_file", refuse("load_file"))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse("safetensors.torch.load_file"))
    return attempts


def test_description_reads_headers_only(adapter_copy: Path, model: ModelConfig, no_tensor_reads: list[str]) -> None:
    """Values the workers would refuse (NaN) pass: the driver never sees them."""
    write_new_embeddings(adapter_copy, 3, 64)
    _set_value("q_proj.lora_A", math.nan)(adapter_copy)
    description = describe(adapter_copy, model)
    assert description == AdapterDescription(name="pirate", path=str(adapter_copy.resolve()), rank=4, extra_tokens=3)
    assert no_tensor_reads == []


def test_description_gives_the_trained_context(adapter_copy: Path, model: ModelConfig) -> None:
    edit_adapter_config(adapter_copy, context_length=3 * model.max_position_embeddings - 1)
    assert describe(adapter_copy, model).long_context_factor == 3.0
    assert load(adapter_copy, model).long_context_factor == 3.0


@pytest.mark.parametrize("case", list(REFUSALS))
def test_description_refuses_what_loading_refuses_but_values(
    adapter_copy: Path, model: ModelConfig, case: str, no_tensor_reads: list[str]
) -> None:
    damage, message = REFUSALS[case]
    damage(adapter_copy)
    if case in ("nan", "inf"):
        assert describe(adapter_copy, model).rank == 4
        return
    with pytest.raises(InvalidRequestError, match="LoRA adapter 'pirate'") as info:
        describe(adapter_copy, model)
    assert message in info.value.message and info.value.param == "lora_path"
    assert no_tensor_reads == []


def _truncate(adapter_dir: Path) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])


def _lying_offsets(adapter_dir: Path) -> None:
    """A header that claims more data than the file holds."""
    weights = adapter_dir / "adapter_model.safetensors"
    key = next(iter(load_file(weights)))
    header = json.dumps({key: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 10**9]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1024)


def _integer_weights(adapter_dir: Path) -> None:
    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        tensors[key] = tensors[key].to(torch.int32)

    edit_tensors(adapter_dir, to_int)


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate, "adapter_model.safetensors cannot be read"),
        (_lying_offsets, "adapter_model.safetensors cannot be read"),
        (_integer_weights, "has dtype torch.int32, not a floating-point type"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x13\x37" * 100), "cannot be read"),
    ],
    ids=["truncated-data", "lying-offsets", "integer-dtype", "garbage"],
)
def test_header_problems_refused_by_both(
    adapter_copy: Path, model: ModelConfig, damage: Callable[[Path], None], message: str
) -> None:
    damage(adapter_copy)
    for read in (describe, load):
        with pytest.raises(InvalidRequestError, match="LoRA adapter 'pirate'") as info:
            read(adapter_copy, model)
        assert message in info.value.message and info.value.param == "lora_path"


def test_description_of_pickle_weights_maps_them(
    base_dir: Path, model: ModelConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zip-format pickle is memory-mapped (its storages never read); the legacy format is read."""
    adapter_dir = make_peft_adapter(base_dir, tmp_path, rank=4, alpha=8, safe_serialization=False)
    with pytest.raises(InvalidRequestError, match="allow_pickle_adapters"):
        describe(adapter_dir, model)
    loads: list[bool] = []
    real_load = torch.load

    def watched_load(*args, mmap: bool = False, **kwargs):
        loads.append(mmap)
        return real_load(*args, mmap=mmap, **kwargs)

    monkeypatch.setattr(torch, "load", watched_load)
    assert describe(adapter_dir, model, allow_pickle=True).rank == 4 and loads == [True]
    weights = adapter_dir / "adapter_model.bin"
    torch.save(real_load(weights, weights_only=True), weights, _use_new_zipfile_serialization=False)
    assert describe(adapter_dir, model, allow_pickle=True).rank == 4 and loads == [True, False]
