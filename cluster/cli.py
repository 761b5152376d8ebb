"""The `raylora` command: serve, make-tiny, bench.

Engine flags are generated from EngineConfig's fields, so a new field is a new flag with no edit here.
Flags default to "not given" so that a YAML value is only overridden by a flag the user typed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from cluster.config import (
    ConfigError,
    EngineConfig,
    describe_config_error,
    format_byte_size,
    parse_byte_size,
    read_config_yaml,
)
from cluster.server.ingress_mode import INGRESS_MODES, default_mode
from cluster.server.options import ServerOptions

CONFIG_ERROR_STATUS = 2


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Let `--flag none` reset an optional field that the YAML set."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def _lora_module_arg(text: str) -> Any:
    """One --lora-modules item: name=path, or a JSON object {"name": ..., "path": ...}."""
    return json.loads(text) if text.lstrip().startswith("{") else text


_lora_module_arg.__name__ = "name=path"  # argparse's "invalid name=path value" message


def _flag_kwargs(field: FieldInfo) -> dict[str, Any]:
    """argparse keyword arguments that turn one EngineConfig field into one flag."""
    annotation, optional = _strip_optional(field.annotation)
    origin = typing.get_origin(annotation)
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _flag_help(field)}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is dict:
        kwargs.update(nargs="+", action="extend", type=_lora_module_arg, metavar="NAME=PATH")
    elif origin in (list, tuple):
        item_type = typing.get_args(annotation)[0]
        kwargs.update(nargs="+", action="extend", type=item_type, metavar=item_type.__name__.upper())
    elif origin is typing.Literal:
        choices = typing.get_args(annotation)
        kwargs.update(type=type(choices[0]), choices=choices)
    else:
        convert = str if is_byte_size(field) else annotation  # "512MiB" is parsed by the field itself
        kwargs["type"] = _none_or(convert) if optional else convert
    return kwargs


def default_label(field: FieldInfo) -> str:
    """A field's default as a person writes it: "required", "512MiB", "None", "16"."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    return format_byte_size(default) if is_byte_size(field) else str(default)


def is_byte_size(field: FieldInfo) -> bool:
    return any(getattr(item, "func", None) is parse_byte_size for item in field.metadata)


def _flag_help(field: FieldInfo) -> str:
    if field.is_required():
        return f"{field.description} (required unless CONFIG.yaml sets it)"
    return f"{field.description} (default: {default_label(field)})".replace("%", "%%")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML file of engine arguments")
    engine = parser.add_argument_group("engine arguments (override CONFIG.yaml)")
    for name, field in EngineConfig.model_fields.items():
        engine.add_argument(flag_name(name), dest=name, **_flag_kwargs(field))
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host", default=ServerOptions.host, help="interface to listen on (default: %(default)s)"
    )
    server.add_argument(
        "--port", type=int, default=ServerOptions.port, help="HTTP port (default: %(default)s)"
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("RAYLORA_API_KEY"),
        help="require this bearer token on every endpoint (default: $RAYLORA_API_KEY, else none)",
    )
    server.add_argument(
        "--address", default=None, help="Ray cluster address to join (default: start a local Ray)"
    )
    server.add_argument(
        "--ingress", choices=INGRESS_MODES, default=default_mode(),
        help="how HTTP reaches the app: Ray's HAProxy ingress (in C, every listener on --host), or Serve's "
        "Python proxy; only for a local Ray (default here: %(default)s; haproxy wherever Ray's HAProxy "
        "is installed)",
    )


def build_engine_config(config_path: str | None, overrides: dict[str, Any]) -> EngineConfig:
    """YAML values, then flags on top; only flags present in `overrides` replace YAML values."""
    data = read_config_yaml(config_path) if config_path else {}
    data.update(overrides)
    if "model" not in data:
        raise ConfigError("no model given: pass CONFIG.yaml with `model:` or --model PATH")
    return EngineConfig(**data)


def _serve_from_namespace(args: argparse.Namespace) -> tuple[EngineConfig, ServerOptions]:
    values = vars(args)
    overrides = {name: values[name] for name in EngineConfig.model_fields if name in values}
    options = ServerOptions(host=args.host, port=args.port, api_key=args.api_key, address=args.address,
                            ingress=args.ingress)
    return build_engine_config(args.config, overrides), options


def parse_serve_args(argv: list[str]) -> tuple[EngineConfig, ServerOptions]:
    """Parse what follows `raylora serve` without serving (raises ConfigError / ValidationError)."""
    parser = argparse.ArgumentParser(prog="raylora serve")
    add_serve_arguments(parser)
    return _serve_from_namespace(parser.parse_args(argv))


def _serve(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            config, options = _serve_from_namespace(args)
    except (ConfigError, ValidationError) as err:
        print(f"raylora: {describe_config_error(err)}", file=sys.stderr)
        return CONFIG_ERROR_STATUS
    for warning in caught:
        print(f"raylora: warning: {warning.message}", file=sys.stderr)
    from cluster.server.main import run_server

    try:
        run_server(config, options)
    except ConfigError as err:  # found before anything started, e.g. a model directory without a tokenizer
        print(f"raylora: {describe_config_error(err)}", file=sys.stderr)
        return CONFIG_ERROR_STATUS
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from cluster.tiny.make_tiny import make_tiny

    manifest = make_tiny(args.out_dir, seed=args.seed)
    print(f"base model and tokenizer: {manifest.base_dir}")
    for adapter in manifest.adapters:
        print(f"adapter {adapter.name} (rank {adapter.rank}): {adapter.path}")
    print(f"manifest: {Path(args.out_dir).resolve() / 'manifest.json'}")
    return 0


def _bench(argv: list[str]) -> int:
    from cluster.bench.cli import main as bench_main

    return bench_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylora", description="Multi-tenant LoRA serving on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    tiny = commands.add_parser("make-tiny", help="write a tiny Llama checkpoint, tokenizer and LoRA adapters")
    tiny.add_argument("out_dir", metavar="OUT_DIR")
    tiny.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)"
    )
    tiny.set_defaults(handler=_make_tiny)
    commands.add_parser(
        "bench", help="run the benchmark (`raylora bench --help` for its options)", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench owns all of its arguments, --help included
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
