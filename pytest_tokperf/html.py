"""The standalone HTML report: one self-contained file, figures inline as SVG.

Per perf test: its verdict and numbers, a throughput-over-time plot (the run's rate
in 50 windows, its mean and confidence interval, the floor) and a latency CDF (TTFT
and TPOT, the SLO limits marked); the baseline's are overlaid when it was compared.
With a history (`--tokperf-history`), a trend of tokens/s over the runs of the same
key, its change points marked and this run highlighted.
The figures need matplotlib (the `html` extra); without it the report says so and
keeps the numbers. Reads only payloads, like every other report.
"""

from __future__ import annotations

import html as _html
import io
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_tokperf import metrics, report, summary
from pytest_tokperf.figures import sweep_figures

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.PASS { color: #17662d; } .FAIL, .INVALID { color: #b00020; }
.INCONCLUSIVE, .ACKNOWLEDGED { color: #9a6700; }
section.test { border-top: 2px solid #ddd; margin-top: 1.5em; }
figure { display: inline-block; margin: 0.5em; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.5em; }
"""


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: inline in HTML


def _interval(p: Mapping[str, Any]) -> tuple[float, float] | None:
    windows = p.get("windows_per_s") or []
    iv = metrics.batch_means(windows, p.get("confidence", 0.95))
    return None if iv is None else (max(0.0, iv.low), iv.high)


def _floor(p: Mapping[str, Any]) -> float | None:
    """The floor on the whole rate: min_tokens_per_s, or per_gpu x devices."""
    floors = p.get("floors") or {}
    candidates = [floors.get("min_tokens_per_s")]
    if floors.get("per_gpu") is not None:
        candidates.append(floors["per_gpu"] * p["engine"]["devices"])
    found = [f for f in candidates if f is not None]
    return max(found) if found else None


def throughput_figure(plt: Any, p: Mapping[str, Any]) -> str:
    """The run's tokens/s over time, its mean and interval, the floor; the baseline's."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    rates = p.get("timeline_per_s") or []
    if rates:
        width = p["duration_s"] / len(rates)
        ax.step([i * width for i in range(len(rates) + 1)], [*rates, rates[-1]],
                where="post", label="this run")  # fmt: skip
    ax.axhline(p["tokens_per_s"], color="C0", linestyle=":", label="mean")
    iv = _interval(p)
    if iv is not None:
        ax.axhspan(*iv, color="C0", alpha=0.15, label=f"{p.get('confidence', 0.95):.0%} CI")
    floor = _floor(p)
    if floor is not None:
        ax.axhline(floor, color="C3", linewidth=2, label="floor")
    base = (p.get("regression") or {}).get("baseline") or {}
    brates = base.get("timeline_per_s") or []
    if brates and base.get("duration_s"):
        width = base["duration_s"] / len(brates)
        ax.step([i * width for i in range(len(brates) + 1)], [*brates, brates[-1]],
                where="post", color="C7", linestyle="--", label="baseline")  # fmt: skip
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title("throughput over time", fontsize="medium")
    text = _svg(fig)
    plt.close(fig)
    return text


def latency_figure(plt: Any, p: Mapping[str, Any]) -> str:
    """Empirical CDFs of TTFT and TPOT with the SLO limits; the baseline's dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    lat = p.get("latencies_ms") or {}
    base = ((p.get("regression") or {}).get("baseline") or {}).get("cdf_ms") or {}
    slos = p.get("slos_ms") or {}
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        for values, style, label in ((lat.get(metric) or [], "-", "this run"),
                                     (base.get(metric) or [], "--", "baseline")):  # fmt: skip
            if values:
                ordered = sorted(values)
                n = len(ordered)
                ax.step(ordered, [(i + 1) / n for i in range(n)], where="post",
                        linestyle=style, label=label)  # fmt: skip
        for key, limit in sorted(slos.items()):
            if key.startswith(metric + "_"):
                pct = key.split("_")[1]
                ax.axvline(limit, color="C3", label=f"SLO {pct} {report.num(limit)} ms")
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small", loc="lower right")
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle("latency CDF", fontsize="medium")
    text = _svg(fig)
    plt.close(fig)
    return text


def trend_figure(plt: Any, trend: Mapping[str, Any]) -> str:
    """The metric over the history's runs: change points, segment means, this run."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    values, names = trend["values"], trend["names"]
    ax.plot(range(len(values)), values, marker="o", markersize=3, color="C0", label="runs")
    edges = [0, *trend["changes"], len(values)]
    for start, stop in itertools.pairwise(edges):
        mean = sum(values[start:stop]) / (stop - start)
        ax.hlines(mean, start - 0.4, stop - 0.6, color="C7", linestyle=":")
    for n, at in enumerate(trend["changes"]):
        ax.axvline(at - 0.5, color="C3", linestyle="--",
                   label="change point" if n == 0 else None)  # fmt: skip
        ax.annotate(names[at], (at - 0.5, 0.03), xycoords=("data", "axes fraction"),
                    fontsize="small", color="C3", rotation=90, ha="right", va="bottom")  # fmt: skip
    for i in trend["current"]:
        ax.plot([i], [values[i]], marker="o", markersize=9, color="C1", linestyle="none",
                label=f"this run ({names[i]})")  # fmt: skip
    ax.set_xlabel("run (oldest first)")
    ax.set_ylabel("output tokens/s" if trend["metric"] == "tokens_per_s" else trend["metric"])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", loc="lower left")
    found = len(trend["changes"])
    title = f"history: {len(values)} runs, {found} change point{'s' * (found != 1)}"
    ax.set_title(title, fontsize="medium")
    text = _svg(fig)
    plt.close(fig)
    return text


def _numbers(p: Mapping[str, Any]) -> str:
    rows = [
        ("scenario", p["scenario"]),
        ("requests", f"{p['requests']:,} ({p['failed']} failed)"),
        ("output tokens/s", report.num(p["tokens_per_s"])),
        ("per device", report.num(p["tokens_per_s_per_gpu"])),
        ("floors", ", ".join(f"{k} {report.num(v)}" for k, v in p["floors"].items()) or "-"),
        ("TTFT p50 / p99", f"{report.ms(p['ttft_s']['p50'])} / {report.ms(p['ttft_s']['p99'])}"),
        ("TPOT p50 / p99", f"{report.ms(p['tpot_s']['p50'])} / {report.ms(p['tpot_s']['p99'])}"),
        ("SLOs", ", ".join(f"{k} {report.num(v)}" for k, v in p["slos_ms"].items()) or "-"),
        ("context", report.context(p)),
    ]
    cells = "".join(f"<tr><th>{k}</th><td>{_html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def fragment(p: Mapping[str, Any], plt: Any = None, trend: Mapping[str, Any] | None = None) -> str:
    """One test's section: verdict, numbers, messages, the figures (and its trend)."""
    verdict = p["verdict"]
    head = (
        f'<section class="test" data-nodeid="{_html.escape(p["nodeid"])}">'
        f'<h2>{_html.escape(p["nodeid"])} <span class="{verdict}">{verdict}</span></h2>'
    )
    if verdict == "SKIPPED" or p.get("kind") is not None:
        return head + f"<p>{_html.escape(str(p.get('reason', '')))}</p></section>"
    lines = [line for line in report.failure_message(p).splitlines() if line]
    lines += summary.regression_lines(p)
    notes = f"<pre>{_html.escape(chr(10).join(lines))}</pre>" if lines else ""
    if plt is None:
        figures = "<p>figures need matplotlib: pip install 'pytest-tokperf[html]'</p>"
    else:
        figures = (
            f'<figure class="throughput">{throughput_figure(plt, p)}</figure>'
            f'<figure class="latency">{latency_figure(plt, p)}</figure>'
        )
        figures += sweep_figures(plt, p)  # a test's sweeps: curve and Pareto plot
        if trend is not None:
            figures += f'<figure class="history">{trend_figure(plt, trend)}</figure>'
            if trend.get("note"):
                figures += f"<p>{_html.escape(trend['note'])}</p>"
    return head + _numbers(p) + notes + figures + "</section>"


def document(
    payloads: Sequence[Mapping[str, Any]],
    profile: str,
    trends: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The whole report as one HTML string (`trends`: node id -> `history.trends`)."""
    plt = _pyplot()
    perf = [p for p in payloads if p.get("kind") is None]
    counts: dict[str, int] = {}
    for p in perf:
        counts[p["verdict"]] = counts.get(p["verdict"], 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    body = "".join(fragment(p, plt, (trends or {}).get(p["nodeid"])) for p in perf)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokperf report</title>"
        f"<style>{_STYLE}</style></head><body><h1>tokperf: profile {_html.escape(profile)}</h1>"
        f"<p>{tally}</p>{body}</body></html>\n"
    )


def write(
    path: Path,
    payloads: Sequence[Mapping[str, Any]],
    profile: str,
    trends: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write the report atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(document(payloads, profile, trends), encoding="utf-8")
    tmp.replace(path)


def add_pytest_html_extra(rep: Any, payloads: Sequence[Mapping[str, Any]]) -> None:
    """pytest-html (4.x `extras`, 3.x `extra`): the test's section, figures included."""
    from pytest_html import extras  # present: the caller checked the plugin is loaded

    perf = [p for p in payloads if p.get("kind") is None]
    if not perf:
        return
    plt = _pyplot()
    name = "extras" if hasattr(rep, "extras") or not hasattr(rep, "extra") else "extra"
    found = list(getattr(rep, name, []))
    found += [extras.html(fragment(p, plt)) for p in perf]
    setattr(rep, name, found)
