"""The sweep's summary: a Markdown and a CSV table, a PNG chart and a JSON, from the per-task results.

Columns: every method's Rouge-L ×100 (Cappy, the seven baselines, then oracle and random, which
bound what any selection can do) and ``cappy - best``: Cappy minus the strongest baseline *of the
mean row* (per task, minus that same baseline), so the last row reads "how far Cappy is above
the best baseline". The mean is the unweighted mean over the finished tasks; failed or missing
tasks are listed under the table.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Mapping

from cappy_core.evaluation import CAPPY, ORACLE, RANDOM, best_baseline, mean_over_tasks

METHOD_ORDER = [CAPPY, "beam4", "sample", "temp0.9", "topk40", "topp0.95", "self_score_sum", "self_score_mean",
                ORACLE, RANDOM]


def _methods(per_task: Mapping[str, Mapping[str, float]]) -> list[str]:
    present = set().union(*(m.keys() for m in per_task.values()))
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def summary_rows(per_task: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list], dict]:
    """``(header, rows, summary)``; rows per task then ``mean``; values rounded to 0.1."""
    means = mean_over_tasks(per_task)
    methods = _methods({"mean": means})
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_reports(out: Path, records: Mapping[str, dict], log=print) -> dict:
    """Write ``summary.{md,csv,png,json}`` under ``out`` and print the table; returns the summary."""
    per_task = {t: r["metrics"] for t, r in records.items() if r.get("status") == "ok"}
    failed = {t: r.get("error", r.get("status")) for t, r in records.items() if r.get("status") != "ok"}
    summary: dict = {"tasks": len(records), "finished": len(per_task), "failed": failed}
    notes = [f"- {t}: {why}" for t, why in failed.items()]
    if not per_task:
        _write_text(out / "summary.md", "No task finished.\n\n" + "\n".join(notes) + "\n")
        _write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        log("no task finished:\n" + "\n".join(notes))
        return summary
    header, rows, stats = summary_rows(per_task)
    summary.update(stats, per_task=per_task)
    table = markdown_table(header, rows)
    text = (f"# Cappy sweep: Rouge-L ×100 on validation ({len(per_task)} task(s))\n\n{table}\n\n"
            f"Best baseline (by mean): {stats['best_baseline']} {stats['best_baseline_value']:.1f}"
            + (f"; Cappy − best = {stats['cappy_minus_best']:+.1f}" if stats["cappy_minus_best"] is not None else "")
            + "\n" + ("\nNot finished:\n" + "\n".join(notes) + "\n" if notes else ""))
    _write_text(out / "summary.md", text)
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    _write_text(out / "summary.csv", buf.getvalue())
    chart = write_chart(out / "summary.png", header, rows, stats["best_baseline"])
    summary.update(table=str(out / "summary.md"), csv=str(out / "summary.csv"), chart=str(chart))
    _write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    log("\n" + text)
    log(f"table: {out / 'summary.md'} and {out / 'summary.csv'}\nchart: {chart}")
    return summary
