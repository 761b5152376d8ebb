"""The benchmark commands run end to end on a tiny workload (figures are not checked: speed is
shown by running them, never by a timed test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cluster.bench.cli import main as bench_main

TINY_WORKLOAD = ["--preset", "tiny", "--num-requests", "4", "--prompt-len", "4", "8", "--output-len", "2", "4",
                 "--max-num-seqs", "4", "--repeats", "2", "--warmup-rounds", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The benchmarks set torch's thread count for the whole process; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_engine_benchmark_reports_every_side(tmp_path: Path, capsys) -> None:
    out = tmp_path / "engine.json"
    assert bench_main(["engine", *TINY_WORKLOAD, "--skip", "ray", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures) == {"raylora (in-process)", "transformers generate (static batch 16)"}
    assert all(value > 0 for value in figures.values())
    assert "/ transformers" in capsys.readouterr().out


def test_lora_benchmark_reports_ratios_and_swap_time(tmp_path: Path, capsys) -> None:
    out = tmp_path / "lora.json"
    argv = ["lora", *TINY_WORKLOAD, "--adapters", "3", "--rank", "4", "--skip", "ray", "--json", str(out)]
    assert bench_main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["swap_ms"] > 0 and len(figures) == 4
    printed = capsys.readouterr().out
    assert "/ peft" in printed and "LoRA overhead ratio" in printed
