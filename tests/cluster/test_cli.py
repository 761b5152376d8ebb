"""The raylora CLI: flags over YAML, generated flags, exit status on config errors, and the docs generator."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from cluster.cli import ServerOptions, build_engine_config, flag_name, main, parse_serve_args
from cluster.config import ConfigError, EngineConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def lora_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "engine.yaml"
    path.write_text(
        "model: /models/base\nenable_lora: true\nmax_loras: 2\nmax_cpu_loras: 8\nblock_size: 32\n"
        "lora_modules:\n  pirate: /adapters/pirate\n"
    )
    return path


def test_flag_overrides_yaml_and_unset_flags_keep_yaml_values(lora_yaml: Path) -> None:
    config, _ = parse_serve_args([str(lora_yaml), "--max-loras", "4"])
    assert config.max_loras == 4
    assert (config.max_cpu_loras, config.block_size, config.enable_lora) == (8, 32, True)
    assert config.lora_modules == {"pirate": "/adapters/pirate"}


def test_yaml_alone_is_not_reset_by_flag_defaults(lora_yaml: Path) -> None:
    config, options = parse_serve_args([str(lora_yaml)])
    assert config == EngineConfig.from_yaml(lora_yaml)
    assert options == ServerOptions()


def test_no_enable_lora_turns_off_yaml_value_and_warns(lora_yaml: Path) -> None:
    with pytest.warns(UserWarning, match="enable_lora is false"):
        config, _ = parse_serve_args([str(lora_yaml), "--no-enable-lora"])
    assert config.enable_lora is False


def test_lora_modules_flag_forms_and_replacement_of_yaml(lora_yaml: Path) -> None:
    config, _ = parse_serve_args([str(lora_yaml), "--lora-modules", "a=/x", "b=/y"])
    assert config.lora_modules == {"a": "/x", "b": "/y"}
    config, _ = parse_serve_args(
        [
            "--model",
            "/m",
            "--enable-lora",
            "--lora-modules",
            '{"name": "a", "path": "/x"}',
            "--lora-modules",
            "b=/y",
        ]
    )
    assert config.lora_modules == {"a": "/x", "b": "/y"}


def test_model_flag_without_yaml_and_typed_flags() -> None:
    flags = (
        "--model /m --enable-lora --cpu-kv-cache-bytes 1GiB --long-lora-scaling-factors 4 2 --dtype bfloat16"
        " --allowed-lora-roots /a /b --port 9000 --address auto"
    )
    config, options = parse_serve_args(flags.split())
    assert config.cpu_kv_cache_bytes == 1024**3
    assert config.long_lora_scaling_factors == (2.0, 4.0)
    assert (config.dtype, config.allowed_lora_roots) == ("bfloat16", ["/a", "/b"])
    assert (options.port, options.address, options.host) == (9000, "auto", "127.0.0.1")


def test_none_resets_an_optional_yaml_value(lora_yaml: Path) -> None:
    config, _ = parse_serve_args([str(lora_yaml), "--max-cpu-loras", "none"])
    assert config.max_cpu_loras is None and config.resolved_max_cpu_loras == 2


def test_no_model_anywhere_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--model"):
        build_engine_config(None, {"max_loras": 2})


def test_help_lists_a_flag_for_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    missing = [name for name in EngineConfig.model_fields if flag_name(name) not in help_text]
    assert missing == []
    assert "--no-enable-lora" in help_text and "--host" in help_text and "--api-key" in help_text


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [
        ("model: /m\nmax_lora: 2\n", [], "did you mean 'max_loras'"),
        ("model: /m\nenable_lora: true\nmax_loras: 4\nmax_cpu_loras: 2\n", [], "raise max_cpu_loras"),
        ("model: [\n", [], "not valid YAML"),
        ("model: /m\n", ["--block-size", "12"], "block_size (12)"),
    ],
)
def test_config_errors_exit_2_with_a_message_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, extra: list[str], message: str
) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text(yaml_text)
    assert main(["serve", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("raylora: ")


def test_serve_hands_config_and_options_to_run_server(
    monkeypatch: pytest.MonkeyPatch, lora_yaml: Path
) -> None:
    calls = []
    server_main = types.ModuleType("cluster.server.main")
    server_main.run_server = lambda config, options: calls.append((config, options))
    monkeypatch.setitem(sys.modules, "cluster.server.main", server_main)
    assert main(["serve", str(lora_yaml), "--port", "8123", "--api-key", "k"]) == 0
    [(config, options)] = calls
    assert config.max_loras == 2 and options == ServerOptions(port=8123, api_key="k")


def test_serve_prints_ignored_lora_settings_as_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], lora_yaml: Path
) -> None:
    server_main = types.ModuleType("cluster.server.main")
    server_main.run_server = lambda config, options: None
    monkeypatch.setitem(sys.modules, "cluster.server.main", server_main)
    assert main(["serve", str(lora_yaml), "--no-enable-lora"]) == 0
    assert (
        "raylora: warning: LoRA settings max_loras, max_cpu_loras, lora_modules are ignored"
        in capsys.readouterr().err
    )


def test_bench_forwards_all_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    bench = types.ModuleType("cluster.bench.cli")
    bench.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "cluster.bench.cli", bench)
    assert main(["bench", "--help", "--num-prompts", "8"]) == 0
    assert seen == [["--help", "--num-prompts", "8"]]


def load_docs_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_generator_check_detects_stale_table_and_rewrite_fixes_it(tmp_path: Path) -> None:
    docs = load_docs_generator()
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n{docs.START}\nold table\n{docs.END}\n\nafter\n")
    assert docs.main(["--readme", str(readme), "--check"]) == 1
    assert docs.main(["--readme", str(readme)]) == 0
    assert docs.main(["--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith("\n\nafter\n")
    assert all(f"`{flag_name(name)}" in text for name in EngineConfig.model_fields)


def test_docs_generator_refuses_a_file_without_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    assert load_docs_generator().main(["--readme", str(readme), "--check"]) == 1


def test_repository_readme_config_reference_is_current() -> None:
    docs = load_docs_generator()
    readme = REPO / "README.md"
    if not readme.exists() or docs.START not in readme.read_text():
        pytest.skip("README.md has no config-reference block yet")
    assert docs.main(["--check"]) == 0, "run: python scripts/gen_config_docs.py"
