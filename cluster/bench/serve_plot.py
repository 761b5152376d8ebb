"""`raylora bench serve --plot`: latency against delivered throughput, HTTP beside the in-process ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.bench.serve_results import Report

INSTALL_HINT = "--plot needs matplotlib: pip install 'raylora[bench]'"


def require_matplotlib() -> None:
    """Fail before the run, not after it, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None


def plot_latency(report: Report, out: Path) -> None:
    """TTFT p50/p99 and TPOT p50 against delivered output tokens/s, one point per rate; the
    in-process ceiling dashed, its saturation throughput as a vertical line."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("HTTP", "-", [run.http for run in report.runs])]
    ceilings = [run.ceiling for run in report.runs if run.ceiling is not None]
    if ceilings:
        series.append(("in-process", "--", ceilings))
    for side, style, runs in series:
        x = [s.delivered_tokens_per_s for s in runs]
        axes[0].plot(x, [s.ttft.p50 for s in runs], style, color="C0", marker="o", label=f"{side} TTFT p50")
        axes[0].plot(x, [s.ttft.p99 for s in runs], style, color="C1", marker="^", label=f"{side} TTFT p99")
        axes[1].plot(x, [s.tpot.p50 for s in runs], style, color="C0", marker="o", label=f"{side} TPOT p50")
    for axis, title in zip(axes, ("time to first token", "time per output token")):
        if report.saturation_ceiling is not None:
            axis.axvline(report.saturation_ceiling.delivered_tokens_per_s, color="grey", linestyle=":",
                         label="in-process saturation")
        axis.set_xlabel("delivered output tokens/s")
        axis.set_ylabel("ms")
        axis.set_yscale("log")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"raylora bench serve: {report.endpoint['num_adapters']} adapters, "
                    f"rates {', '.join(f'{run.rate:.3g}' for run in report.runs)} req/s")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
