"""The benchmark's outputs: the markdown table, the JSON document and the ratio chart.

bench/run.py measures and assembles one document (a dict: config, machine, settings, skipped,
participants, workloads, failures, load_averages, duration_s); ``write`` turns it into the files
``results.md``, ``results.json`` and ``ratios.png`` (``*-quick.*`` for a --quick run).  The
workloads appear in the order of ``doc["workloads"]`` (run.py puts them in table order), the
systems in the order of adapters.ADAPTERS, each under its adapter's label.

A ratio is always oriented so that above 1 means mmkv is better; run.py computes them, this
module only shows them.  matplotlib is optional: without it the chart is skipped with a note.
"""
import json
import math
import os

from adapters import ADAPTERS


def fmt(v, unit):
    """One figure as shown in the table and the log."""
    if v is None:
        return "-"
    if unit == "ops/s":
        return f"{v:,.0f}"
    if unit in ("ms", "us"):
        return f"{v:,.3f}" if v < 1 else (f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
    if unit == "x":
        return f"{v:.2f}"
    if unit == "MB":
        return f"{v:,.1f}"
    if unit == "B":
        return f"{v:,.1f}"
    return f"{v:.4g}"


def fmt_ratio(r):
    if r >= 10:
        return f"×{r:.1f}"
    return f"×{r:.2f}" if r >= 0.1 else f"×{r:.2g}"


def columns(results):
    """The systems that have a figure anywhere, in table order; then the variants of mmkv some
    workloads measure (another build, another key space), in the order they first appear."""
    present = {}
    for wl in results.values():
        for m in wl["metrics"]:
            present.update(dict.fromkeys(m["values"]))
    return [s for s in ADAPTERS if s in present] + [s for s in present if s not in ADAPTERS]


def label(system: str) -> str:
    return ADAPTERS[system].label if system in ADAPTERS else system


def markdown(doc):
    res = doc["workloads"]
    cols = columns(res)
    mach = doc["machine"]
    lines = [f"# mmkv benchmark{' (quick)' if doc['config']['quick'] else ''}", ""]
    lines.append(f"{mach['cpu']}, {mach['cores']} cores, "
                 f"{(mach['memory_bytes'] or 0) / 2**30:.0f} GiB, {mach['platform']}, Python {mach['python']}, "
                 f"stores on {mach['filesystem']['type']} ({mach['filesystem']['mount']}); mmkv commit "
                 f"{mach['git_commit'] or '?'}; run took {doc['duration_s'] / 60:.1f} min; median of "
                 f"{doc['config']['repeats']} repeats; 1-min load average {doc['load_averages']['start'][0]} "
                 f"at the start, {doc['load_averages']['end'][0]} at the end.")
    if mach.get("mmkv_uncommitted_changes"):
        lines.append("")
        lines.append("Measured with uncommitted changes in: " + ", ".join(mach["mmkv_uncommitted_changes"]) + ".")
    lines.append("")
    lines.append("Each peer's cell is its figure followed by the **mmkv/peer ratio: above 1 means mmkv is better** "
                 "(throughput: mmkv ÷ peer; times and sizes: peer ÷ mmkv).")
    lines.append("")
    head = ["workload", "metric", "unit"] + [label(c) for c in cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * len(cols)) + "|")
    for name, wl in res.items():
        for m in wl["metrics"]:
            unit_label = {"x": "× logical", "us": "µs"}.get(m["unit"], m["unit"])
            row = [name, m["label"], unit_label]
            for c in cols:
                v = m["values"].get(c)
                if v is None:
                    row.append("")
                    continue
                cell = fmt(v.get("median"), m["unit"])
                if v.get("exact") is False:
                    cell = f"FAIL (count {v['final_counts']}, expected {v['expected']})"
                elif c in m["ratios"]:
                    cell += f" ({fmt_ratio(m['ratios'][c])})"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Units: ops/s = operations per second (higher is better); ms, µs = time (lower is better); "
                 "× logical = bytes on disk per live logical byte (lower is better); MB = 10^6 bytes.")
    lines.append("")
    notes = [(name, n) for name, wl in res.items() for n in wl["notes"]]
    if notes:
        lines.append("## Notes")
        lines.append("")
        for name, n in notes:
            lines.append(f"- **{name}**: {n}")
        lines.append("")
    lines.append("## Settings")
    lines.append("")
    for s in doc["settings"]:
        lines.append(f"- {s}")
    lines.append("")
    if doc["skipped"]:
        lines.append("## Skipped peers")
        lines.append("")
        for s, why in doc["skipped"].items():
            lines.append(f"- {s}: {why}")
        lines.append("")
    lines.append("## Failures")
    lines.append("")
    if doc["failures"]:
        for f in doc["failures"]:
            lines.append(f"- {f['workload']} / {f['system']}: {f['message']}")
    else:
        lines.append("None: every read-back, count and final counter value checked out.")
    lines.append("")
    return "\n".join(lines)


def chart(doc, path):
    """Write the ratio heat map to path; return None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except Exception as exc:
        return f"chart skipped: matplotlib is not importable ({exc})"
    res = doc["workloads"]
    rows, labels = [], []
    cols = [c for c in columns(res) if c != "mmkv"]
    for name, wl in res.items():
        for m in wl["metrics"]:
            if m["ratios"]:
                rows.append([m["ratios"].get(c) for c in cols])
                labels.append(f"{name}: {m['label']}")
    if not rows or not cols:
        return "chart skipped: no ratios"
    used = [j for j in range(len(cols)) if any(r[j] is not None for r in rows)]
    cols = [cols[j] for j in used]
    rows = [[r[j] for j in used] for r in rows]
    vals = [v for r in rows for v in r if v]
    span = max(2.0, max(abs(math.log10(v)) for v in vals))
    data = [[v if v else float("nan") for v in r] for r in rows]
    fig_h = 1.2 + 0.42 * len(rows)
    fig, ax = plt.subplots(figsize=(3.2 + 1.25 * len(cols) + 3.5, fig_h))
    im = ax.imshow(data, cmap="RdYlGn", norm=LogNorm(vmin=10 ** -span, vmax=10 ** span), aspect="auto")
    ax.set_xticks(range(len(cols)), [label(c) for c in cols], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if v:
                ax.text(j, i, fmt_ratio(v), ha="center", va="center", fontsize=8)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("mmkv / peer (log scale)")
    title = "mmkv vs peers: ratio > 1 (green) means mmkv is better"
    if doc["config"]["quick"]:
        title += " (quick run)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(doc, out):
    """Write results.md, ratios.png and results.json (``-quick`` names for a quick run) into out.

    Sets doc["chart"] (and doc["chart_note"] when the chart is skipped).  Returns (markdown text,
    None or why the chart was skipped).
    """
    os.makedirs(out, exist_ok=True)
    suffix = "-quick" if doc["config"]["quick"] else ""
    md = markdown(doc)
    with open(os.path.join(out, f"results{suffix}.md"), "w") as f:
        f.write(md)
    png = os.path.join(out, f"ratios{suffix}.png")
    why = chart(doc, png)
    doc["chart"] = None if why else os.path.basename(png)
    if why:
        doc["chart_note"] = why
    with open(os.path.join(out, f"results{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return md, why
