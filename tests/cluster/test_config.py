"""EngineConfig: defaults, every validation message, the LoRA-off warning, YAML loading and input forms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import ConfigError, EngineConfig, describe_config_error

REPO = Path(__file__).resolve().parents[2]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    return path


def test_defaults_and_resolved_properties() -> None:
    config = EngineConfig(model="/models/base")
    assert (config.max_loras, config.max_lora_rank, config.lora_extra_vocab_size) == (1, 16, 256)
    assert config.cpu_kv_cache_bytes == 512 * 1024**2
    assert config.lora_modules == {} and config.allowed_lora_roots == []
    assert config.resolved_max_cpu_loras == 1
    assert config.resolved_tokenizer == "/models/base"
    assert config.resolved_served_model_name == "/models/base"
    named = EngineConfig(
        model="/m", enable_lora=True, tokenizer="/t", served_model_name="base", max_loras=2, max_cpu_loras=8
    )
    assert (named.resolved_tokenizer, named.resolved_served_model_name, named.resolved_max_cpu_loras) == (
        "/t",
        "base",
        8,
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_loras": 0}, r"max_loras \(0\) must be >= 1"),
        ({"max_lora_rank": -8}, r"max_lora_rank \(-8\) must be >= 1"),
        ({"tensor_parallel_size": 0}, r"tensor_parallel_size \(0\) must be >= 1"),
        ({"max_num_seqs": 0}, r"max_num_seqs \(0\) must be >= 1"),
        ({"max_model_len": 0}, r"max_model_len \(0\) must be >= 1"),
        ({"block_size": 0}, r"block_size \(0\) must be a positive power of 2"),
        ({"block_size": 12}, r"block_size \(12\) must be a positive power of 2"),
        (
            {"max_loras": 4, "max_cpu_loras": 2},
            r"max_cpu_loras \(2\) must be >= max_loras \(4\): raise max_cpu_loras or lower max_loras",
        ),
        (
            {"lora_dtype": "fp8"},
            r"lora_dtype \('fp8'\) is unknown: use one of auto, float16, bfloat16, float32",
        ),
        (
            {"long_lora_scaling_factors": [2.0, 0.0]},
            r"long_lora_scaling_factors \[0.0, 2.0\] must all be > 0",
        ),
        ({"long_lora_scaling_factors": [4, 2, 4]}, r"long_lora_scaling_factors .* contains duplicates"),
        ({"lora_modules": {"": "/adapters/a"}}, r"lora_modules entry '' .* needs a non-empty name and path"),
        ({"lora_modules": {"a": " "}}, r"lora_modules entry 'a' .* needs a non-empty name and path"),
        ({"lora_extra_vocab_size": -1}, r"lora_extra_vocab_size \(-1\) must be >= 0"),
        ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization \(0.0\) must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization \(1.5\) must be in \(0, 1\]"),
        ({"cpu_kv_cache_bytes": "lots"}, r"cpu_kv_cache_bytes \('lots'\) is not a byte size"),
        ({"lora_modules": ["pirate"]}, r"lora_modules entry 'pirate' is not name=path"),
        ({"lora_modules": ["a=/x", "a=/y"]}, r"lora_modules names \['a'\] appear more than once"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EngineConfig(model="/m", enable_lora=True, **settings)


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ValidationError) as caught:
        EngineConfig(model="/m", max_loras=0, block_size=3)
    text = describe_config_error(caught.value)
    assert "max_loras (0)" in text and "block_size (3)" in text and "Value error" not in text


def test_missing_model_is_explained() -> None:
    with pytest.raises(ValidationError) as caught:
        EngineConfig()
    assert "model is required" in describe_config_error(caught.value)


def test_lora_settings_without_enable_lora_warn_and_name_them() -> None:
    with pytest.warns(UserWarning, match=r"max_loras, lora_modules are ignored because enable_lora is false"):
        EngineConfig(model="/m", max_loras=4, max_lora_rank=16, lora_modules={"a": "/x"})


@pytest.mark.parametrize(
    "settings",
    [
        {"enable_lora": True, "max_loras": 4, "lora_modules": {"a": "/x"}},
        {"max_loras": 1, "lora_dtype": "auto"},  # explicit, but equal to the defaults
        {"tensor_parallel_size": 2},
    ],
)
def test_no_warning_when_nothing_is_ignored(settings: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EngineConfig(model="/m", **settings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("64MB", 64_000_000),
        ("1.5 KiB", 1536),
        ("4096", 4096),
        (2048, 2048),
    ],
)
def test_byte_sizes_are_normalized_to_int(text: str | int, expected: int) -> None:
    assert EngineConfig(model="/m", cpu_kv_cache_bytes=text).cpu_kv_cache_bytes == expected


@pytest.mark.parametrize(
    "modules",
    [
        {"pirate": "/a/pirate", "shouty": "/a/shouty"},
        [{"name": "pirate", "path": "/a/pirate"}, {"name": "shouty", "path": "/a/shouty"}],
        ["pirate=/a/pirate", "shouty=/a/shouty"],
        [{"pirate": "/a/pirate"}, "shouty = /a/shouty"],
    ],
)
def test_lora_modules_forms_normalize_to_a_dict(modules: object) -> None:
    config = EngineConfig(model="/m", enable_lora=True, lora_modules=modules)
    assert config.lora_modules == {"pirate": "/a/pirate", "shouty": "/a/shouty"}


def test_normalizations_of_lora_dtype_and_scaling_factors() -> None:
    config = EngineConfig(
        model="/m", enable_lora=True, lora_dtype="half", long_lora_scaling_factors=[8, 2.0, 4]
    )
    assert config.lora_dtype == "float16"
    assert config.long_lora_scaling_factors == (2.0, 4.0, 8.0)


def test_config_is_frozen() -> None:
    config = EngineConfig(model="/m")
    with pytest.raises(ValidationError, match="frozen"):
        config.max_loras = 8


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        EngineConfig(model="/m", max_lora=2)


def test_yaml_dict_round_trips_through_json() -> None:
    config = EngineConfig(
        model="/m", enable_lora=True, max_loras=2, long_lora_scaling_factors=(4.0,), lora_modules={"a": "/x"}
    )
    plain = json.loads(json.dumps(config.to_yaml_dict()))
    assert EngineConfig.from_dict(plain) == config


def test_from_yaml_reads_values_and_kebab_case_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model: /m\nenable-lora: true\nmax_loras: 2\ncpu_kv_cache_bytes: 64MiB\n")
    config = EngineConfig.from_yaml(path)
    assert (config.enable_lora, config.max_loras, config.cpu_kv_cache_bytes) == (True, 2, 64 * 1024**2)


def test_yaml_unknown_key_suggests_the_nearest_name(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model: /m\nmax_cpu_lora: 4\nfrobnicate: 1\n")
    with pytest.raises(ConfigError, match=r"'max_cpu_lora' \(did you mean 'max_cpu_loras'\?\), 'frobnicate'"):
        EngineConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("model: [\n", "is not valid YAML"), ("- model\n", "must be a mapping"), ("", "model is required")],
)
def test_bad_yaml_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises((ConfigError, ValidationError)) as caught:
        EngineConfig.from_yaml(write_yaml(tmp_path, text))
    assert message in describe_config_error(caught.value)


def test_missing_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        EngineConfig.from_yaml(tmp_path / "absent.yaml")


def test_tiny_yaml_parses() -> None:
    config = EngineConfig.from_yaml(REPO / "configs" / "tiny.yaml")
    assert config.model == ".demo/tiny/base"
    assert config.resolved_served_model_name == "tiny-llama"
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.resolved_max_cpu_loras) == (
        True,
        2,
        16,
        4,
    )
    assert set(config.lora_modules) == {"pirate", "shouty", "counter"}
    assert all(path.startswith(".demo/tiny/adapters/") for path in config.lora_modules.values())
    assert (config.device, config.dtype, config.max_model_len) == ("cpu", "float32", 512)


def test_llama_example_yaml_parses() -> None:
    config = EngineConfig.from_yaml(REPO / "configs" / "llama-3.2-1b-lora.yaml")
    assert config.enable_lora
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras, config.lora_extra_vocab_size) == (
        4,
        64,
        16,
        512,
    )
    assert len(config.lora_modules) == 2
