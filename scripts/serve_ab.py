"""Server variants, interleaved: `raylora bench serve` run in turn with each variant's flags (A B C,
C B A, ...), each run's JSON kept, then the median of each issue-11 target figure, the latencies and
the CPU split per variant, and each one's ratio to the first, printed as a Markdown table.

    python scripts/serve_ab.py --rounds 2 --out /tmp/serve_ab \\
        --variant "proxy+ingress=--ingress serve-proxy --separate-ingress" \\
        --variant "haproxy+direct=--ingress haproxy" \\
        -- --rates 5 --duration 30 --slo-ttft-ms 2000 --slo-tpot-ms 100

Everything after `--` goes to every run unchanged (give one rate: the table reads the first).
`NAME@DIR=FLAGS` runs that variant from another checkout (e.g. a `git worktree` of an older
commit), so two versions of the code meet in one interleaved run. Each run gets its checkout on
PYTHONPATH: Ray's worker processes import raylora (the job's setup hook) before they see the
driver's directory, so without it they would take the installed (editable) copy, not the checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str
    flags: list[str]
    checkout: Path | None = None  # run this checkout's code; None: this one

    @classmethod
    def parse(cls, text: str) -> Variant:
        label, _, flags = text.partition("=")
        name, _, checkout = label.partition("@")
        if not name or not re.fullmatch(r"[\w+.-]+", name):
            raise argparse.ArgumentTypeError(f"expected NAME[@DIR]=FLAGS with a file-safe NAME, got {text!r}")
        if checkout and not (Path(checkout) / "cluster").is_dir():
            raise argparse.ArgumentTypeError(f"{checkout!r} is not a raylora checkout")
        return cls(name, shlex.split(flags), Path(checkout).resolve() if checkout else None)


def run_once(variant: Variant, round_index: int, out_dir: Path, bench_args: list[str]) -> Path:
    result = out_dir / f"{variant.name}-{round_index}.json"
    command = [sys.executable, "-m", "cluster.cli", "bench", "serve", *variant.flags, "--no-progress",
               "--json", str(result), *bench_args]
    print(f"== round {round_index}, {variant.name}: {' '.join(command[3:])}", flush=True)
    checkout = variant.checkout or Path(__file__).resolve().parent.parent
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    with open(out_dir / f"{variant.name}-{round_index}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=checkout, env=environment)
    return result


def short_name(target_name: str) -> str:
    """The target's name without what differs between runs (the running count, the rate and the
    load's share, which `--target-load` sets from each run's own in-process saturation)."""
    name = re.sub(r"\s*\(\d+% of in-process saturation\)", "", target_name)
    return re.sub(r" at [\d.]+ (running|req/s)", "", name)


def figures(report: dict) -> dict[str, float]:
    """Each target's measured value by its name, plus the first rate's latencies and CPU split."""
    values = {short_name(target["name"]): target["value"] for target in report["targets"]}
    run = report["runs"][0]
    http = run["http"]
    values["TTFT p50 ms"] = http["ttft"]["p50"]
    values["TTFT p99 ms"] = http["ttft"]["p99"]
    values["TPOT p50 ms"] = http["tpot"]["p50"]
    values["delivered tok/s"] = http["delivered_tokens_per_s"]
    for role, value in run["cpu_ms_per_streamed_token"].items():
        values[f"CPU ms/token: {role}"] = value
    for role, value in (run.get("cpu_ms_per_streamed_token_above_idle") or {}).items():
        values[f"CPU ms/token above idle: {role}"] = value
    return values


def median_of(runs: list[dict[str, float]], name: str) -> float | None:
    values = [run[name] for run in runs if name in run]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=Variant.parse, action="append", required=True,
                        help="NAME=FLAGS, at least two; ratios are to the first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/serve_ab"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --out (summarize again)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    args.out = args.out.resolve()  # runs from another checkout write here too
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variant
    if len(variants) < 2:
        parser.error("give at least two --variant")
    results: dict[str, list[dict[str, float]]] = {variant.name: [] for variant in variants}
    for round_index in range(args.rounds):
        for variant in variants if round_index % 2 == 0 else reversed(variants):
            path = args.out / f"{variant.name}-{round_index}.json"
            if not (args.reuse and path.exists()):
                path = run_once(variant, round_index, args.out, bench_args)
            results[variant.name].append(figures(json.loads(path.read_text())))
    first = variants[0].name
    names = list(dict.fromkeys(name for runs in results.values() for name in runs[0]))
    header = " | ".join(variant.name for variant in variants)
    ratios = " | ".join(f"{variant.name} / {first}" for variant in variants[1:])
    print(f"\n| figure (median of {args.rounds}) | {header} | {ratios} |")
    print("|" + " --- |" * (1 + 2 * len(variants) - 1))
    for name in names:
        medians = [median_of(results[variant.name], name) for variant in variants]
        shown = [f"{value:.3g}" if value is not None else "-" for value in medians]
        base = medians[0]
        shown += [f"{value / base:.2f}" if base and value is not None else "-" for value in medians[1:]]
        print(f"| {name} | {' | '.join(shown)} |")

if __name__ == "__main__":
    main()
