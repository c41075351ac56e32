"""The sweep's report: a Markdown and a CSV table, a PNG chart and a JSON, from the per-task results.

Columns: every method's Rouge-L ×100 (Cappy, the seven baselines, then oracle and random, which
bound what any selection can do) and ``cappy - best``: Cappy minus the strongest baseline *of the
mean row* (per task, minus that same baseline), so the last row reads "how far Cappy is above
the best baseline". The mean is the unweighted mean over the finished tasks; failed or missing
tasks are listed under the table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping

from cappy_core.evaluation import CAPPY, ORACLE, RANDOM, best_baseline, mean_over_tasks, method_order
from cappy_core.io import atomic_path, write_json, write_text


def table_methods(present: set[str]) -> list[str]:
    """The table's columns: the methods present, in :func:`cappy_core.evaluation.method_order`,
    then any others alphabetically."""
    order = method_order()
    return [m for m in order if m in present] + sorted(present - set(order))


def summary_rows(per_task: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list], dict]:
    """``(header, rows, summary)``; rows per task then ``mean``; values rounded to 0.1."""
    means = mean_over_tasks(per_task)
    methods = table_methods(set(means))
    best_name, best_value = best_baseline(means)
    has_cappy = CAPPY in means
    header = ["task"] + methods + (["cappy - best"] if has_cappy else [])
    rows = []
    for task, m in list(per_task.items()) + [("mean", means)]:
        row = [task] + [round(m[k], 1) if k in m else None for k in methods]
        if has_cappy:
            row.append(round(m[CAPPY] - m[best_name], 1) if CAPPY in m and best_name in m else None)
        rows.append(row)
    summary = {"mean": means, "best_baseline": best_name, "best_baseline_value": best_value,
               "cappy_minus_best": (means[CAPPY] - best_value) if has_cappy else None}
    return header, rows, summary


def progress_line(task: str, record: Mapping) -> str:
    """One finished task, as the sweep prints it: Cappy, beam4 and oracle, and its wall time."""
    m, nan = record["metrics"], float("nan")
    return (f"{task}: cappy {m.get(CAPPY, nan):.1f}, beam4 {m.get('beam4', nan):.1f}, oracle {m[ORACLE]:.1f} "
            f"({record['wall_s']:.0f}s)")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        name = f"**{r[0]}**" if r[0] == "mean" else r[0]
        lines.append("| " + " | ".join([name] + [cell(v) for v in r[1:]]) + " |")
    return "\n".join(lines)


def write_chart(path: Path, header: list[str], rows: list[list], best_name: str) -> Path:
    """Left: Cappy minus the best baseline per task (and the mean). Right: the mean of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    tasks = [r[0] for r in rows]
    if "cappy - best" in header:
        delta = [r[header.index("cappy - best")] or 0.0 for r in rows]
        ax1.barh(tasks, delta, color=["tab:green" if d >= 0 else "tab:red" for d in delta])
        ax1.axvline(0, color="black", lw=0.8)
        ax1.set_xlabel(f"Cappy − {best_name} (Rouge-L ×100)")
    ax1.invert_yaxis()
    ax1.set_title("per task")
    mean = rows[-1]
    names = [h for h in header[1:] if h != "cappy - best" and mean[header.index(h)] is not None]
    vals = [mean[header.index(h)] for h in names]
    colors = ["tab:green" if n == CAPPY else "tab:gray" if n in (ORACLE, RANDOM) else "tab:blue" for n in names]
    ax2.barh(names, vals, color=colors)
    for i, v in enumerate(vals):
        ax2.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("mean Rouge-L ×100 over tasks")
    ax2.set_title(f"mean of {len(rows) - 1} task(s)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_reports(out: Path, records: Mapping[str, dict], log=print) -> dict:
    """Write ``summary.{md,csv,png,json}`` under ``out`` and print the table; returns the summary."""
    per_task = {t: r["metrics"] for t, r in records.items() if r.get("status") == "ok"}
    failed = {t: r.get("error", r.get("status")) for t, r in records.items() if r.get("status") != "ok"}
    summary: dict = {"tasks": len(records), "finished": len(per_task), "failed": failed}
    notes = [f"- {t}: {why}" for t, why in failed.items()]
    if not per_task:
        write_text(out / "summary.md", "No task finished.\n\n" + "\n".join(notes) + "\n")
        write_json(out / "summary.json", summary)
        log("no task finished:\n" + "\n".join(notes))
        return summary
    header, rows, stats = summary_rows(per_task)
    summary.update(stats, per_task=per_task)
    table = markdown_table(header, rows)
    text = (f"# Cappy sweep: Rouge-L ×100 on validation ({len(per_task)} task(s))\n\n{table}\n\n"
            f"Best baseline (by mean): {stats['best_baseline']} {stats['best_baseline_value']:.1f}"
            + (f"; Cappy − best = {stats['cappy_minus_best']:+.1f}" if stats["cappy_minus_best"] is not None else "")
            + "\n" + ("\nNot finished:\n" + "\n".join(notes) + "\n" if notes else ""))
    write_text(out / "summary.md", text)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_text(out / "summary.csv", buf.getvalue())
    chart = write_chart(out / "summary.png", header, rows, stats["best_baseline"])
    summary.update(table=str(out / "summary.md"), csv=str(out / "summary.csv"), chart=str(chart))
    write_json(out / "summary.json", summary)
    log("\n" + text)
    log(f"table: {out / 'summary.md'} and {out / 'summary.csv'}\nchart: {chart}")
    return summary
