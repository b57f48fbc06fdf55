"""The sweep figures of the HTML report, from a payload's `sweeps` (`sweep.Sweep.to_json`).

- throughput vs latency: each point's completed requests/s against its TTFT and TPOT
  p99 (one panel each), points labelled with their load, the SLO limits as lines, the
  capacity found (`tokperf.capacity`) as a vertical line where the test searched one;
- the Pareto plot: output tokens/s per user (median 1 / TPOT) against output tokens/s
  per GPU, the frontier (points no other beats on both) joined, points that met every
  SLO filled, the TPOT limit as the least per-user rate it allows, and the capacity as
  the per-GPU rate it implies (capacity x mean output tokens per request / devices).
Reads only payloads; matplotlib's pyplot comes from the caller (`html`).
"""

from __future__ import annotations

import html as _html
import io
from collections.abc import Mapping, Sequence
from typing import Any

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"))


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _label(s: Mapping[str, Any], point: Mapping[str, Any]) -> str:
    load = point[s["axis"]]
    return f"{load:g} qps" if s["axis"] == "qps" else f"c={load:g}"


def _met(point: Mapping[str, Any]) -> bool:
    """Met every SLO (or had none to meet: MEASURED)."""
    return point["status"] in ("PASS", "MEASURED")


def latency_curve(plt: Any, s: Mapping[str, Any]) -> str:
    """Throughput vs TTFT p99 and TPOT p99, SLO limits and the capacity marked."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    points = s["points"]
    for ax, (metric, name) in zip(axes, LATENCIES, strict=True):
        xs = [p["requests_per_s"] for p in points]
        ys = [p[f"{metric}_p99_ms"] for p in points]
        shown = [(x, y, p) for x, y, p in zip(xs, ys, points, strict=True) if y is not None]
        ax.plot([x for x, _, _ in shown], [y for _, y, _ in shown], marker="o", color="C0",
                label=f"{name} p99")  # fmt: skip
        for x, y, p in shown:
            ax.annotate(_label(s, p), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")  # fmt: skip
        for key, limit in sorted((s.get("slos_ms") or {}).items()):
            if key.startswith(metric + "_"):
                ax.axhline(limit, color="C3", label=f"SLO {key.split('_')[1]} {limit:,.0f} ms")
        if s.get("capacity_qps") is not None:
            ax.axvline(s["capacity_qps"], color="C2", linestyle="--",
                       label=f"capacity {s['capacity_qps']:,.4g} requests/s")  # fmt: skip
        ax.set_xlabel("completed requests/s")
        ax.set_ylabel(f"{name} p99 (ms)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="x-small", loc="best")
    fig.suptitle(f"{s['scenario']} sweep over {s['axis']}: throughput vs latency",
                 fontsize="medium")  # fmt: skip
    text = _svg(fig)
    plt.close(fig)
    return text


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (higher is better), by x."""
    return sorted(
        p for p in points
        if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
    )  # fmt: skip


def pareto(plt: Any, s: Mapping[str, Any]) -> str:
    """Output tokens/s per user against per GPU; frontier, SLO and capacity marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    shown = [p for p in s["points"] if p["tokens_per_s_per_user"] is not None]
    xy = [(p["tokens_per_s_per_user"], p["tokens_per_s_per_gpu"]) for p in shown]
    front = frontier(xy)
    if front:
        ax.plot([x for x, _ in front], [y for _, y in front], color="C0", linestyle="-",
                label="Pareto frontier")  # fmt: skip
    for (x, y), p in zip(xy, shown, strict=True):
        ax.plot([x], [y], marker="o", color="C0", markerfacecolor="C0" if _met(p) else "white",
                linestyle="none")  # fmt: skip
        ax.annotate(_label(s, p), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small")  # fmt: skip
    if s.get("slos_ms"):
        ax.plot([], [], marker="o", color="C0", linestyle="none", label="met every SLO")
        ax.plot([], [], marker="o", color="C0", markerfacecolor="white", linestyle="none",
                label="did not pass the SLOs")  # fmt: skip
    for key, limit in sorted((s.get("slos_ms") or {}).items()):
        if key.startswith("tpot_"):
            ax.axvline(1000 / limit, color="C3",
                       label=f"SLO TPOT {key.split('_')[1]} {limit:,.0f} ms "
                             f"(>= {1000 / limit:,.3g} tokens/s per user)")  # fmt: skip
    cap = s.get("capacity_qps")
    per_request = [p["tokens_per_s"] / p["requests_per_s"] for p in shown if p["requests_per_s"]]
    if cap is not None and per_request and shown:
        at = cap * sum(per_request) / len(per_request) / shown[0]["devices"]
        said = f"capacity {cap:,.4g} requests/s (~{at:,.0f} tokens/s per GPU)"
        ax.axhline(at, color="C2", linestyle="--", label=said)
    ax.set_xlabel("output tokens/s per user (median 1 / TPOT)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="x-small", loc="best")
    ax.set_title("Pareto: per-user speed vs per-GPU throughput", fontsize="medium")
    text = _svg(fig)
    plt.close(fig)
    return text


def sweep_figures(plt: Any, p: Mapping[str, Any]) -> str:
    """Both figures of each of the payload's sweeps, and its points as a table."""
    out = []
    for s in p.get("sweeps") or ():
        out.append(f'<figure class="sweep">{latency_curve(plt, s)}</figure>')
        out.append(f'<figure class="pareto">{pareto(plt, s)}</figure>')
        out.append(_table(s))
    return "".join(out)


def _table(s: Mapping[str, Any]) -> str:
    cols = (s["axis"], "status", "requests_per_s", "tokens_per_s", "tokens_per_s_per_gpu",
            "tokens_per_s_per_user", "ttft_p99_ms", "tpot_p99_ms")  # fmt: skip
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_html.escape(_cell(p.get(c)))}</td>" for c in cols) + "</tr>"
        for p in s["points"]
    )
    return f'<table class="sweep-points"><tr>{head}</tr>{rows}</table>'


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if isinstance(value, float) else str(value)
