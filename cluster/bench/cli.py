"""`raylora bench engine|lora|serve`: picks the benchmark; each one parses its own flags."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """`raylora bench [engine] ...`, `raylora bench lora ...` or `raylora bench serve ...`."""
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv and argv[0] == "serve":
        from cluster.bench.serve import main as bench_serve

        return bench_serve(argv[1:])
    if argv and argv[0] == "lora":
        from cluster.bench.lora import main as bench_lora

        return bench_lora(argv[1:])
    if argv and argv[0] == "engine":
        argv = argv[1:]
    from cluster.bench.engine import main as bench_engine

    return bench_engine(argv)


if __name__ == "__main__":
    raise SystemExit(main())
