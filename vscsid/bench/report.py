"""Benchmark reports people look at.

``write_report(res, DIR)`` turns one ``vscsid-bench`` result into ``DIR/index.html`` (a
self-contained page: the PNGs are embedded, the page alone can be mailed or attached to a
ticket), the plots as PNG files beside it (``latency.png``, ``iops.png``, ``cpu.png``) and
``result.json``. ``compare(a, b)`` shows two results side by side as text;
``write_compare_report`` does the same as a page with the two runs' plots overlaid.

Plots need matplotlib (``pip install 'vscsid[bench]'``, or Debian's python3-matplotlib); the
text comparison does not.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import Any, Callable

from .config import EXIT_USAGE, BenchError

__all__ = ["load_result", "compare", "compare_rows", "write_report", "write_compare_report"]


# ------------------------------------------------------------------ loading results
def load_result(path: str) -> dict:
    """A result from a file: ``vscsid-bench --json`` output (its last JSON line), the
    ``result.json`` of a report, or a JSON object holding one under ``"result"``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise BenchError(f"{path}: {e.strerror}", EXIT_USAGE) from None
    res = None
    try:
        res = json.loads(text)
    except ValueError:
        for line in reversed(text.strip().splitlines()):
            try:
                res = json.loads(line)
                break
            except ValueError:
                continue
    if isinstance(res, dict) and "result" in res and isinstance(res["result"], dict):
        res = res["result"]
    if not isinstance(res, dict) or res.get("tool") != "vscsid-bench":
        raise BenchError(f"{path}: not a vscsid-bench result (vscsid-bench --json writes one)",
                         EXIT_USAGE)
    if res.get("fatal") and "ios" not in res:
        raise BenchError(f"{path}: the run failed: {res['fatal']}", EXIT_USAGE)
    return res


# ------------------------------------------------------------------ the numbers
def _fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: "-" if v is None else format(v, fmt)


#: (label, how to get it from a result, how to print it, "higher" or "lower" is better)
METRICS: list[tuple[str, Callable[[dict], Any], Callable[[Any], str], str]] = [
    ("IOPS", lambda r: r["iops"], _num(",.0f"), "higher"),
    ("bandwidth MiB/s", lambda r: r["bw_bytes"] / 2**20, _num(",.1f"), "higher"),
    ("latency mean", lambda r: r["lat_ns"]["mean"], _fmt_ns, "lower"),
    ("latency p50", lambda r: r["lat_ns"]["p50"], _fmt_ns, "lower"),
    ("latency p90", lambda r: r["lat_ns"]["p90"], _fmt_ns, "lower"),
    ("latency p99", lambda r: r["lat_ns"]["p99"], _fmt_ns, "lower"),
    ("latency p99.9", lambda r: r["lat_ns"]["p99.9"], _fmt_ns, "lower"),
    ("latency max", lambda r: r["lat_ns"]["max"], _fmt_ns, "lower"),
    ("daemon CPU us/request", lambda r: r.get("daemon_cpu_us_per_io"), _num(".2f"), "lower"),
    ("bench CPU us/request", lambda r: r.get("cpu_us_per_io"), _num(".2f"), "lower"),
    ("flush latency mean", lambda r: r.get("flush_lat_mean_ns") if r.get("flushes") else None,
     _fmt_ns, "lower"),
    ("requests", lambda r: r["ios"], _num(",d"), "higher"),
    ("errors", lambda r: r["errors"], _num("d"), "lower"),
    ("other CPU-s on the machine", lambda r: r.get("other_cpu_seconds"), _num(".2f"), "lower"),
]

#: the settings that make two runs comparable (or not)
SETTINGS = ("format", "rw", "rwmixread", "bs_human", "iodepth", "queues", "engine", "size",
            "seconds", "ramp", "verify", "event_idx", "flush_every")


def _setting(res: dict, key: str) -> Any:
    if key == "engine":
        return res.get("engine")
    return res.get("config", {}).get(key)


def _device(res: dict) -> str:
    d = res.get("device", {})
    return " ".join(str(x) for x in (d.get("format"), d.get("inquiry") or "") if x).strip()


def compare_rows(a: dict, b: dict) -> list[dict]:
    """One row per metric: label, both values (raw and printed), B against A in percent and
    whether that is better."""
    rows = []
    for label, get, fmt, better in METRICS:
        try:
            va, vb = get(a), get(b)
        except (KeyError, TypeError):
            va = vb = None
        change = None
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va:
            change = 100.0 * (vb - va) / va
        rows.append({"metric": label, "a": va, "b": vb, "a_text": fmt(va), "b_text": fmt(vb),
                     "change_pct": change,
                     "better": None if change is None or change == 0
                     else (change > 0) == (better == "higher")})
    return rows


def setting_differences(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    return [(k, _setting(a, k), _setting(b, k)) for k in SETTINGS if _setting(a, k) != _setting(b, k)]


def compare(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The two runs side by side, as text."""
    rows = compare_rows(a, b)
    w0 = max(len(r["metric"]) for r in rows)
    w1 = max([len(names[0])] + [len(r["a_text"]) for r in rows])
    w2 = max([len(names[1])] + [len(r["b_text"]) for r in rows])
    out = [f"A = {names[0]}: {_device(a)}", f"B = {names[1]}: {_device(b)}", "",
           f"{'':<{w0}}  {'A':>{w1}}  {'B':>{w2}}  B vs A"]
    for r in rows:
        if r["a"] is None and r["b"] is None:
            continue
        ch = "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        if r["better"] is not None:
            ch += " (better)" if r["better"] else " (worse)"
        out.append(f"{r['metric']:<{w0}}  {r['a_text']:>{w1}}  {r['b_text']:>{w2}}  {ch}")
    diffs = setting_differences(a, b)
    out.append("")
    if diffs:
        out.append("settings that differ: " + ", ".join(f"{k} {va!r} vs {vb!r}" for k, va, vb in diffs))
    else:
        out.append("same settings: " + ", ".join(f"{k}={_setting(a, k)}" for k in SETTINGS
                                                  if _setting(a, k) not in (None, False, 0)))
    return "\n".join(out)


# ------------------------------------------------------------------ plots
def require_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BenchError("reports need matplotlib: pip install 'vscsid[bench]' "
                         "(or apt-get install python3-matplotlib)", EXIT_USAGE) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: display bins per power of two (the histogram itself has finer ones)
BINS_PER_OCTAVE = 8


def _hist_steps(res: dict) -> tuple[list[float], list[float]]:
    """Edges (us) and the share of requests in each display bin: the histogram's buckets
    regrouped into bins of equal width on a log scale (BINS_PER_OCTAVE per power of two)."""
    buckets = res.get("lat_hist") or []
    total = sum(c for _, _, c in buckets)
    if not total:
        return [], []
    bins: dict[int, int] = {}
    for lo, hi, c in buckets:
        mid = max(1.0, (lo + hi) / 2)
        k = math.floor(math.log2(mid) * BINS_PER_OCTAVE)
        bins[k] = bins.get(k, 0) + c
    first, last = min(bins), max(bins)
    edges = [2 ** (k / BINS_PER_OCTAVE) / 1e3 for k in range(first, last + 2)]
    shares = [100.0 * bins.get(k, 0) / total for k in range(first, last + 1)]
    return edges, shares


def plot_latency(ax, res: dict, label: str | None = None, color=None, marks: bool = True) -> None:
    edges, shares = _hist_steps(res)
    if not shares:
        ax.text(0.5, 0.5, "no latency histogram in this result", ha="center", transform=ax.transAxes)
        return
    ax.stairs(shares, edges, fill=label is None, alpha=0.8 if label else 0.6, label=label,
              color=color, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("latency (us, log scale)")
    ax.set_ylabel(f"% of requests (bins of 1/{BINS_PER_OCTAVE} octave)")
    if marks:
        lat = res["lat_ns"]
        for key, style in (("p50", "-"), ("p99", "--"), ("p99.9", ":")):
            ax.axvline(lat[key] / 1e3, color=color or "black", linestyle=style, linewidth=0.8,
                       label=f"{key} {_fmt_ns(lat[key])}" + (f" ({label})" if label else ""))
    ax.grid(True, which="both", alpha=0.25)


def _series(res: dict) -> tuple[float, list[list[int]]]:
    tl = res.get("timeline") or {}
    return tl.get("interval_s", 0.1), tl.get("per_queue_ios") or []


def plot_iops(ax, res: dict, label: str | None = None, color=None, per_queue: bool = True) -> None:
    step, series = _series(res)
    if not series or not any(series):
        ax.text(0.5, 0.5, "no timeline in this result", ha="center", transform=ax.transAxes)
        return
    n = max(len(s) for s in series)
    xs = [step * (i + 1) for i in range(n)]
    if per_queue:
        for q, s in enumerate(series):
            ax.plot(xs[:len(s)], [c / step for c in s], linewidth=1, label=f"queue {q}")
    if len(series) > 1 or not per_queue:
        total = [sum(s[i] for s in series if i < len(s)) / step for i in range(n)]
        ax.plot(xs, total, linewidth=1.8, color=color or "black",
                label="all queues" + (f" ({label})" if label else ""))
    ax.set_xlabel("seconds into the measured window")
    ax.set_ylabel("IOPS")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.25)


def _daemon_per_request_steps(res: dict) -> tuple[list[float], list[float]]:
    step, series = _series(res)
    cpu = (res.get("timeline") or {}).get("daemon_cpu_seconds") or []
    xs, ys = [], []
    for i, c in enumerate(cpu):
        n = sum(s[i] for s in series if i < len(s))
        if n:
            xs.append(step * (i + 1))
            ys.append(c * 1e6 / n)
    return xs, ys


def plot_cpu(axes, runs: list[tuple[str, dict]]) -> None:
    """Left: CPU per request of the daemon and of the bench (the guest's side) per run;
    right: the daemon's CPU per request over time (when it was counted per step)."""
    bar, line = axes
    width = 0.8 / max(1, len(runs))
    for k, (name, res) in enumerate(runs):
        vals = [res.get("daemon_cpu_us_per_io") or 0.0, res.get("cpu_us_per_io") or 0.0]
        xs = [i + k * width - 0.4 + width / 2 for i in range(2)]
        bars = bar.bar(xs, vals, width, label=name)
        bar.bar_label(bars, fmt="%.2f", fontsize=8)
    bar.set_xticks([0, 1], ["daemon", "bench (guest side)"])
    bar.set_ylabel("CPU us per request")
    if not any(res.get("daemon_cpu_us_per_io") for _, res in runs):
        bar.set_title("daemon not counted (--daemon-pid or --daemon-cgroup)", fontsize=8)
    if len(runs) > 1:
        bar.legend(fontsize=8)
    shown = False
    for name, res in runs:
        xs, ys = _daemon_per_request_steps(res)
        if xs:
            line.plot(xs, ys, linewidth=1.2, label=name)
            shown = True
    if shown:
        line.set_xlabel("seconds into the measured window")
        line.set_ylabel("daemon CPU us per request")
        line.set_ylim(bottom=0)
        line.grid(True, alpha=0.25)
        if len(runs) > 1:
            line.legend(fontsize=8)
    else:
        line.axis("off")
        line.text(0.5, 0.5, "per-step daemon CPU is counted\nwith --daemon-cgroup", ha="center",
                  va="center", transform=line.transAxes)


def _title(res: dict) -> str:
    c = res.get("config", {})
    return (f"{c.get('format')} {c.get('rw')} bs={c.get('bs_human')} iodepth={c.get('iodepth')} "
            f"queues={c.get('queues')}")


def _save(fig, path: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return data


def _figures(runs: list[tuple[str, dict]], outdir: str) -> dict[str, bytes]:
    """latency.png, iops.png, cpu.png for one run or several (overlaid)."""
    plt = require_pyplot()
    out = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    one = len(runs) == 1

    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for k, (name, res) in enumerate(runs):
        plot_latency(ax, res, label=None if one else name, color=None if one else colors[k % len(colors)])
    ax.set_title("latency histogram" + (f": {_title(runs[0][1])}" if one else ""))
    ax.legend(fontsize=8)
    out["latency.png"] = _save(fig, os.path.join(outdir, "latency.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for k, (name, res) in enumerate(runs):
        plot_iops(ax, res, label=None if one else name, per_queue=one,
                  color=None if one else colors[k % len(colors)])
    ax.set_title("IOPS over time" + (" per queue" if one else ""))
    ax.legend(fontsize=8)
    out["iops.png"] = _save(fig, os.path.join(outdir, "iops.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    plot_cpu(axes, runs)
    fig.suptitle("CPU per request")
    out["cpu.png"] = _save(fig, os.path.join(outdir, "cpu.png"))
    plt.close(fig)
    return out


# ------------------------------------------------------------------ pages
_CSS = """body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.2em .8em;border-bottom:1px solid #ddd;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}.better{color:#070}.worse{color:#a00}
img{max-width:100%;display:block;margin:.5em 0 1.5em}code{background:#f4f4f4;padding:0 .2em}"""


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _img(name: str, data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" title="{html.escape(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def _settings_rows(res: dict) -> list[tuple[str, Any]]:
    c, d = res.get("config", {}), res.get("device", {})
    rows = [("device", _device(res) or "-"),
            ("capacity", d.get("capacity_bytes")),
            ("socket", c.get("socket_path") or ("in-process loopback" if c.get("loopback") else "-"))]
    rows += [(k, _setting(res, k)) for k in SETTINGS]
    m = res.get("machine") or {}
    if m:
        rows.append(("machine", f"kernel {m.get('kernel')}, {m.get('cpus')} CPUs, "
                                f"Python {m.get('python')}"))
    return rows


def _result_rows(res: dict) -> list[tuple[str, Any]]:
    rows = []
    for label, get, fmt, _ in METRICS:
        try:
            v = get(res)
        except (KeyError, TypeError):
            v = None
        if v is not None:
            rows.append((label, fmt(v)))
    if "daemon_cpu_seconds" in res:
        rows.append(("daemon CPU counted from", res.get("daemon_cpu_source", "pids")))
    if "verify" in res:
        v = res["verify"]
        rows.append(("verify", "ok" if v.get("ok") else "FAILED"))
    if res.get("first_error"):
        rows.append(("first error", json.dumps(res["first_error"])))
    if res.get("fatal"):
        rows.append(("fatal", res["fatal"]))
    return rows


def write_report(res: dict, outdir: str) -> list[str]:
    """Write the report of one run into ``outdir`` (created); returns the files written."""
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    figs = _figures([("run", res)], outdir)
    title = f"vscsid-bench: {_title(res)}"
    body = [f"<h1>{html.escape(title)}</h1>",
            "<h2>Results</h2>", _table(_result_rows(res)),
            _img("latency.png", figs["latency.png"], "latency histogram"),
            _img("iops.png", figs["iops.png"], "IOPS over time per queue"),
            _img("cpu.png", figs["cpu.png"], "CPU per request"),
            "<h2>Settings</h2>", _table(_settings_rows(res)),
            "<p>The numbers are the measured window's (the ramp excluded). The raw result is "
            "<code>result.json</code> beside this page; <code>vscsid-bench --compare A.json "
            "B.json</code> compares two.</p>"]
    with open(os.path.join(outdir, "index.html"), "w") as f:
        f.write(_page(title, body))
    return [os.path.join(outdir, n) for n in ("index.html", "result.json", *figs)]


def write_compare_report(a: dict, b: dict, outdir: str, names: tuple[str, str] = ("A", "B")) -> list[str]:
    """The two runs side by side as a page (the plots overlaid) in ``outdir``."""
    os.makedirs(outdir, exist_ok=True)
    figs = _figures([(names[0], a), (names[1], b)], outdir)
    head = (f"<tr><th></th><th>{html.escape(names[0])}</th><th>{html.escape(names[1])}</th>"
            "<th>B vs A</th></tr>")
    cells = []
    for r in compare_rows(a, b):
        if r["a"] is None and r["b"] is None:
            continue
        cls = ' class="n"' if r["better"] is None else (' class="n better"' if r["better"] else ' class="n worse"')
        ch = "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        cells.append(f"<tr><th>{html.escape(r['metric'])}</th><td class=\"n\">{html.escape(r['a_text'])}"
                     f"</td><td class=\"n\">{html.escape(r['b_text'])}</td><td{cls}>{ch}</td></tr>")
    diffs = setting_differences(a, b)
    title = f"vscsid-bench: {names[0]} vs {names[1]}"
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>A = {html.escape(names[0])} ({html.escape(_device(a))}), "
            f"B = {html.escape(names[1])} ({html.escape(_device(b))})</p>",
            f"<table>{head}{''.join(cells)}</table>",
            "<p>" + ("Settings that differ: " + html.escape(", ".join(f"{k} {va!r} vs {vb!r}"
                                                                      for k, va, vb in diffs))
                     if diffs else "Same settings.") + "</p>",
            _img("latency.png", figs["latency.png"], "latency histograms"),
            _img("iops.png", figs["iops.png"], "IOPS over time"),
            _img("cpu.png", figs["cpu.png"], "CPU per request"),
            "<h2>Settings of A</h2>", _table(_settings_rows(a)),
            "<h2>Settings of B</h2>", _table(_settings_rows(b))]
    with open(os.path.join(outdir, "index.html"), "w") as f:
        f.write(_page(title, body))
    return [os.path.join(outdir, n) for n in ("index.html", *figs)]
