"""Serve's Python proxy against Ray's HAProxy ingress, interleaved: `raylora bench serve` run in turn
with `--ingress serve-proxy` and `--ingress haproxy` (A B A B ...), each run's JSON kept, then the
median of each issue-11 target figure per mode and their ratio printed as a Markdown table.

    python scripts/ingress_ab.py --rounds 2 --out /tmp/ingress_ab -- --rates 5 --duration 30 \\
        --slo-ttft-ms 2000 --slo-tpot-ms 100

Everything after `--` goes to every `raylora bench serve` run unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("serve-proxy", "haproxy")


def run_once(mode: str, round_index: int, out_dir: Path, bench_args: list[str]) -> Path:
    result = out_dir / f"{mode}-{round_index}.json"
    command = [sys.executable, "-m", "cluster.cli", "bench", "serve", "--ingress", mode, "--no-progress",
               "--json", str(result), *bench_args]
    print(f"== round {round_index}, {mode}: {' '.join(command[3:])}", flush=True)
    with open(out_dir / f"{mode}-{round_index}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return result


def short_name(target_name: str) -> str:
    """The target's name without what differs between runs (the running count, the load's share)."""
    name = re.sub(r"\s*\(\d+% of in-process saturation\)", "", target_name)
    return re.sub(r" at [\d.]+ running", "", name)


def figures(report: dict) -> dict[str, float]:
    """Each target's measured value by its name, plus the first rate's latencies and CPU split
    (pass one rate: `--rate R` or `--rates R`)."""
    values = {short_name(target["name"]): target["value"] for target in report["targets"]}
    run = report["runs"][0]
    http = run["http"]
    values["TTFT p50 ms"] = http["ttft"]["p50"]
    values["TTFT p99 ms"] = http["ttft"]["p99"]
    values["TPOT p50 ms"] = http["tpot"]["p50"]
    values["delivered tok/s"] = http["delivered_tokens_per_s"]
    for role, value in run["cpu_ms_per_streamed_token"].items():
        values[f"CPU ms/token: {role}"] = value
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ingress_ab"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --out (summarize again)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES if round_index % 2 == 0 else reversed(MODES):
            path = args.out / f"{mode}-{round_index}.json"
            if not (args.reuse and path.exists()):
                path = run_once(mode, round_index, args.out, bench_args)
            results[mode].append(figures(json.loads(path.read_text())))
    names = list(results[MODES[0]][0])
    print(f"\n| figure (median of {args.rounds}) | {MODES[0]} | {MODES[1]} | {MODES[1]} / {MODES[0]} |")
    print("| --- | --- | --- | --- |")
    for name in names:
        a = statistics.median(r[name] for r in results[MODES[0]] if name in r)
        b = statistics.median(r[name] for r in results[MODES[1]] if name in r)
        print(f"| {name} | {a:.3g} | {b:.3g} | {b / a:.2f} |" if a else f"| {name} | {a:.3g} | {b:.3g} | - |")


if __name__ == "__main__":
    main()
