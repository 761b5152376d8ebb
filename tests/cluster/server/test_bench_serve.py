"""`raylora bench serve` end to end against the session's server (`--base-url`), in seconds.

No second Ray or Serve is started: the benchmark finds the server's model and adapter on this
host through `/v1/models`, so its in-process ceiling runs too.
"""

from __future__ import annotations

import json

import pytest

from cluster.bench.cli import main as bench_main


def test_bench_serve_smoke(server, tmp_path, capsys):
    out = tmp_path / "figures.json"
    code = bench_main([
        "serve", "--base-url", server.url, "--api-key", server.api_key, "--num-adapters", "1",
        "--base-fraction", "0.3", "--rates", "8,16", "--num-requests", "6", "--input-len", "4", "12",
        "--output-len", "2", "6", "--burst", "4", "--threads", "1", "--slo-ttft-ms", "60000",
        "--idle-window", "0.5", "--no-progress", "--json", str(out),
    ])
    assert code == 0
    figures = json.loads(out.read_text())
    assert [run["rate"] for run in figures["runs"]] == [8.0, 16.0]
    for run in figures["runs"]:
        http, ceiling = run["http"], run["ceiling"]
        assert http["completed"] == 6 and http["errors"] == {} and http["missing_tokens"] == 0
        assert http["total_tokens"] == ceiling["total_tokens"]  # exact output lengths on both sides
        assert http["ttft"]["count"] == 6 and http["ttft"]["p50"] > 0
        assert http["goodput_requests_per_s"] > 0
        assert run["cpu_ms_per_streamed_token"]["serving path"] > 0  # the session's server runs here
        assert run["wakeups_per_streamed_token"]["serving path"] > 0  # its threads waited for each request
        above_idle = run["cpu_ms_per_streamed_token_above_idle"]
        assert above_idle["serving path"] < run["cpu_ms_per_streamed_token"]["serving path"]
    assert figures["idle_cpu_ms_per_s"]["serving path"] > 0  # Ray's actors poll even when idle
    assert figures["saturation"]["http"]["completed"] == 6 and figures["saturation"]["ceiling"]["completed"] == 6
    assert set(figures["burst_tokens_per_s"]) == {"http streamed", "http not streamed", "python api (in-process)"}
    assert figures["lone_ttft_ms"] > 0
    assert any(t["name"].startswith("saturation") for t in figures["targets"])
    printed = capsys.readouterr().out
    assert "TTFT ms p50/p90/p99" in printed and "issue 11 targets" in printed and "wake-ups per streamed token" in printed
    assert "above the same processes' idle rate" in printed


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match=r"raylora\[bench\]"):
        bench_main(["serve", "--plot", "out.png", "--base-url", "http://127.0.0.1:1"])


def test_bench_serve_target_half_load(server, tmp_path):
    """--target-load half: the in-process saturation first, then one run at half its throughput."""
    out = tmp_path / "half.json"
    assert bench_main([
        "serve", "--base-url", server.url, "--api-key", server.api_key, "--num-adapters", "1",
        "--target-load", "half", "--num-requests", "4", "--input-len", "4", "8", "--output-len", "2", "4",
        "--threads", "1", "--skip", "saturation", "burst", "--idle-window", "0", "--no-progress", "--json", str(out),
    ]) == 0
    figures = json.loads(out.read_text())
    saturation = figures["saturation"]["ceiling"]["delivered_tokens_per_s"]
    (run,) = figures["runs"]
    assert run["rate"] == pytest.approx(0.5 * saturation / 3.0, rel=0.5)  # outputs of 2-4 tokens, ~3 on average
    assert run["http"]["completed"] == 4 and figures["saturation"]["http"] is None
