"""The sweep's report: Markdown and CSV tables, a PNG chart and a JSON, from the per-task results.

Main table (``summary.csv``): every method's Rouge-L ×100 (Cappy, the fused selector, the
baselines, then oracle and random, which bound what any selection can do) and ``cappy - best``:
Cappy minus the strongest baseline *of the mean row* (:func:`cappy_core.selection.evaluation.best_baseline`,
MBR included; per task, minus that same baseline), so the last row reads "how far Cappy is above
the best baseline". The mean is the unweighted mean over the finished tasks; failed or missing
tasks are listed under the table.

How sure (``summary_ci.csv``): for every method but the bounds and the best baseline itself, the
paired-bootstrap 95% interval (:func:`cappy_core.selection.bootstrap.paired_bootstrap`: instructions
resampled within each task, 2,000 resamples, seeded) of method − best baseline, per task and for
the mean over tasks, from each task record's ``per_instruction`` values
(:func:`cappy_core.selection.evaluation.per_instruction_values`). A record without them (written before
they were recorded) still reports, without intervals; the mean's interval needs every task's.
Long format: ``method, baseline, task, diff, low, high, half_width`` (``task`` = ``mean`` for the
mean over tasks), rounded to 0.01.

Rank agreement (``summary_spearman.csv``): each task record's ``spearman``
(:func:`cappy_core.selection.evaluation.ranker_spearman`), long format ``task, ranker, spearman,
instructions``; the ``mean`` rows are the unweighted mean over the tasks that have a value.

Tasks the scorer never saw (``cappy sweep --zero-shot``): the rows ``cappy-0shot`` and
``fused-0shot`` (:mod:`cappy_core.selection.zero_shot`), with their paired intervals against
beam4 and MBR as well (:func:`zero_shot_section`, ``summary.json``'s ``zero_shot``).

``summary.json`` holds all of it (``intervals``, ``spearman``: None when no record has them);
``summary.png`` shows the selectors' differences from the best baseline with their intervals as
error bars, and every method's mean.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from cappy_core.selection.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, paired_bootstrap
from cappy_core.selection.evaluation import (
    BOUNDS, CAPPY, CAPPY_0SHOT, FUSED_0SHOT, MBR, ORACLE, SELECTORS, best_baseline, mean_over_tasks, method_order,
)
from cappy_core.io import atomic_path, write_json, write_text

#: Above this half-width (Rouge-L points) of the mean's Cappy − best interval, the report says
#: the validation set is too small to resolve the differences it shows.
RESOLUTION_POINTS = 1.0


def table_methods(present: set[str]) -> list[str]:
    """The table's columns: the methods present, in :func:`cappy_core.selection.evaluation.method_order`,
    then any others alphabetically."""
    order = method_order()
    order[2:2] = [CAPPY_0SHOT, FUSED_0SHOT]  # after the fused selector: added to a record by --zero-shot
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


# --- how sure: paired intervals against the best baseline ----------------------------------

def paired_intervals(per_instruction: Mapping[str, Mapping[str, Sequence[float]]], methods: Sequence[str],
                     baseline: str, tasks: Sequence[str], *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> dict[str, dict[str, Any]]:
    """``{method: {"mean": Interval | None, "per_task": {task: Interval}}}``: method − ``baseline``
    on the tasks whose ``per_instruction[task]`` has both; the mean's interval only when that is
    every one of ``tasks`` (else it would be a mean over other tasks than the table's)."""
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        pairs = {t: (v[m], v[baseline]) for t, v in per_instruction.items() if m in v and baseline in v}
        if not pairs:
            continue
        total, per = paired_bootstrap(pairs, resamples=resamples, seed=seed)
        out[m] = {"mean": total if set(pairs) == set(tasks) else None, "per_task": {t: per[t] for t in tasks
                                                                                       if t in per}}
    return out


def interval_json(iv: Interval | None) -> dict[str, float] | None:
    return None if iv is None else {**iv.as_dict(), "half_width": iv.half_width}


def interval_cell(iv: Interval | None) -> str:
    return "" if iv is None else f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]"


def intervals_section(intervals: Mapping[str, Mapping[str, Any]], baseline: str, tasks: Sequence[str],
                      sizes: Sequence[int], resamples: int = DEFAULT_RESAMPLES) -> str:
    """The Markdown "vs best baseline" table (rows = methods; the mean's difference, its 95%
    interval and half-width, then each task's) and, when Cappy's mean interval is wider than
    ±:data:`RESOLUTION_POINTS`, the sentence that says so."""
    header = ["method", "mean", "95% CI", "±"] + list(tasks)
    lines = [f"## vs best baseline ({baseline})", "",
             f"Method − {baseline}, Rouge-L ×100, with paired-bootstrap 95% intervals (validation instructions "
             f"resampled within each task, {resamples:,} resamples, seeded).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m, iv in intervals.items():
        mean = iv["mean"]
        cells = ([f"{mean.mean:+.1f}", f"[{mean.low:+.1f}, {mean.high:+.1f}]", f"{mean.half_width:.1f}"]
                 if mean is not None else ["", "", ""])
        lines.append("| " + " | ".join([m] + cells + [interval_cell(iv["per_task"].get(t)) for t in tasks]) + " |")
    cappy = intervals.get(CAPPY, {}).get("mean")
    if cappy is not None and cappy.half_width > RESOLUTION_POINTS:
        n = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"
        lines += ["", f"{n} validation instructions per task cannot resolve differences below "
                      f"±{cappy.half_width:.1f} points (the half-width of Cappy − {baseline} on the mean)."]
    return "\n".join(lines)


def zero_shot_section(per_instruction: Mapping[str, Mapping[str, Sequence[float]]], tasks: Sequence[str],
                      baselines: Sequence[str] = ("beam4", MBR)) -> tuple[str, dict[str, Any]] | None:
    """The Markdown section on the zero-shot rows and its JSON: each row − each of ``baselines``
    (those every task has), mean over tasks with its paired 95% interval; None without the rows."""
    rows = [m for m in (CAPPY_0SHOT, FUSED_0SHOT) if all(m in per_instruction.get(t, {}) for t in tasks)]
    if not rows or not tasks:
        return None
    lines = ["## Tasks the scorer never saw (leave-one-task-out)", "",
             "`cappy-0shot` / `fused-0shot`: each task picked by a selector finetuned on the *other* tasks' pairs, "
             "its fused weights fitted on their dev instructions, the way `cappy serve` picks for a task without a "
             "scorer of its own. Mean over tasks, paired 95% intervals:", ""]
    out: dict[str, Any] = {}
    for base in [b for b in baselines if all(b in per_instruction.get(t, {}) for t in tasks)]:
        ivs = paired_intervals(per_instruction, rows, base, tasks)
        out[base] = {m: {"mean": interval_json(iv["mean"]),
                         "per_task": {t: interval_json(x) for t, x in iv["per_task"].items()}} for m, iv in ivs.items()}
        lines += [f"- {m} − {base}: {interval_cell(iv['mean'])}" for m, iv in ivs.items()]
    return "\n".join(lines), out


# --- rank agreement within instructions -----------------------------------------------------

def spearman_summary(per_task: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{"per_task": per_task, "mean": {ranker: {"mean", "tasks"}}}``: the unweighted mean over
    the tasks where the ranker has a value."""
    rankers = table_methods({r for v in per_task.values() for r in v})
    mean: dict[str, dict[str, Any]] = {}
    for r in rankers:
        vals = [v[r]["mean"] for v in per_task.values() if r in v and v[r]["mean"] is not None]
        mean[r] = {"mean": sum(vals) / len(vals) if vals else None, "tasks": len(vals)}
    return {"per_task": {t: dict(v) for t, v in per_task.items()}, "mean": mean}


def spearman_section(spearman: Mapping[str, Any]) -> str:
    """The Markdown table of within-instruction Spearman: rows = tasks then the mean, columns = rankers."""
    rankers = list(spearman["mean"])

    def cell(v: Mapping[str, Any] | None, count: str) -> str:
        return "" if v is None or v["mean"] is None else f"{v['mean']:+.2f} ({v[count]})"

    lines = ["## Within-instruction Spearman (ranker vs Rouge-L)", "",
             "Mean over a task's validation instructions of the rank correlation between a ranker's value and "
             "the candidates' Rouge-L; in brackets the instructions counted (one where either side is constant "
             "has no correlation), on the mean row the tasks.", "",
             "| " + " | ".join(["task"] + rankers) + " |", "|" + "|".join(["---"] + ["---:"] * len(rankers)) + "|"]
    for t, v in spearman["per_task"].items():
        lines.append("| " + " | ".join([t] + [cell(v.get(r), "instructions") for r in rankers]) + " |")
    lines.append("| " + " | ".join(["**mean**"] + [cell(spearman["mean"][r], "tasks") for r in rankers]) + " |")
    return "\n".join(lines)


# --- formatting and files ---------------------------------------------------------------------

def progress_line(task: str, record: Mapping) -> str:
    """One finished task, as the sweep prints it: Cappy, beam4 and oracle, and its wall time."""
    m, nan = record["metrics"], float("nan")
    training = record.get("training") or {}
    reused = [what for what, info in (("finetune", training), ("selector finetune", training.get("selector")))
              if isinstance(info, dict) and str(info.get("cache", "")).startswith("reused")]
    return (f"{task}: cappy {m.get(CAPPY, nan):.1f}, beam4 {m.get('beam4', nan):.1f}, oracle {m[ORACLE]:.1f} "
            f"({record['wall_s']:.0f}s" + "".join(f"; {w} reused from the stage cache" for w in reused) + ")")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        name = f"**{r[0]}**" if r[0] == "mean" else r[0]
        lines.append("| " + " | ".join([name] + [cell(v) for v in r[1:]]) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def ci_rows(intervals: Mapping[str, Mapping[str, Any]] | None, baseline: str) -> list[list]:
    """``summary_ci.csv``: header, then per method its tasks and ``mean`` (values rounded to 0.01)."""
    rows: list[list] = [["method", "baseline", "task", "diff", "low", "high", "half_width"]]
    for m, iv in (intervals or {}).items():
        for t, x in list(iv["per_task"].items()) + [("mean", iv["mean"])]:
            if x is not None:
                rows.append([m, baseline, t] + [round(v, 2) for v in (x.mean, x.low, x.high, x.half_width)])
    return rows


def spearman_rows(spearman: Mapping[str, Any] | None) -> list[list]:
    """``summary_spearman.csv``: header, then per task and ranker, then the ``mean`` rows (0.001)."""
    rows: list[list] = [["task", "ranker", "spearman", "instructions"]]
    if spearman is None:
        return rows
    for t, v in list(spearman["per_task"].items()) + [("mean", spearman["mean"])]:
        for r, x in v.items():
            rho = None if x["mean"] is None else round(x["mean"], 3)
            rows.append([t, r, rho, x.get("instructions", x.get("tasks"))])
    return rows


def write_chart(path: Path, header: list[str], rows: list[list], best_name: str,
                intervals: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Left: each selector (Cappy, the fused one) minus the best baseline per task and on the
    mean, with its 95% interval as an error bar where known. Right: the mean of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) * 1.5 + 2.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    tasks = [r[0] for r in rows]
    col = {h: i for i, h in enumerate(header)}
    selectors = [m for m in SELECTORS if m in col and best_name in col]
    height = 0.8 / max(len(selectors), 1)
    for k, m in enumerate(selectors):
        ivs = (intervals or {}).get(m)
        delta, err = [], [[], []]
        for r in rows:
            iv = None if ivs is None else (ivs["mean"] if r[0] == "mean" else ivs["per_task"].get(r[0]))
            d = iv.mean if iv is not None else (
                r[col[m]] - r[col[best_name]] if r[col[m]] is not None and r[col[best_name]] is not None else 0.0)
            delta.append(d)
            err[0].append(d - iv.low if iv is not None else np.nan)  # NaN: no error bar drawn
            err[1].append(iv.high - d if iv is not None else np.nan)
        y = np.arange(len(rows)) + (k - (len(selectors) - 1) / 2) * height
        xerr = np.array(err)
        ax1.barh(y, delta, height=height, color="tab:green" if m == CAPPY else "tab:purple", alpha=0.85,
                 xerr=None if np.isnan(xerr).all() else xerr, error_kw={"capsize": 3, "lw": 1}, label=m)
    if selectors:
        ax1.axvline(0, color="black", lw=0.8)
        ax1.set_xlabel(f"selector − {best_name} (Rouge-L ×100)" + (", 95% paired bootstrap CI" if intervals else ""))
        ax1.legend(loc="best", fontsize=8)
    ax1.set_yticks(range(len(rows)), tasks)
    ax1.invert_yaxis()
    ax1.set_title("per task")
    mean = rows[-1]
    names = [h for h in header[1:] if h != "cappy - best" and mean[col[h]] is not None]
    vals = [mean[col[h]] for h in names]
    colors = ["tab:green" if n == CAPPY else "tab:purple" if n in SELECTORS else "tab:gray" if n in BOUNDS
              else "tab:orange" if n == best_name else "tab:blue" for n in names]
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
    """Write ``summary.{md,csv,png,json}``, ``summary_ci.csv`` and ``summary_spearman.csv`` under
    ``out`` and print the tables; returns the summary."""
    ok = {t: r for t, r in records.items() if r.get("status") == "ok"}
    per_task = {t: r["metrics"] for t, r in ok.items()}
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
    best = stats["best_baseline"]
    tasks = list(per_task)

    per_instruction = {t: r["per_instruction"] for t, r in ok.items() if r.get("per_instruction")}
    without = [t for t in tasks if t not in per_instruction]
    compared = [m for m in table_methods(set(stats["mean"])) if m not in BOUNDS and m != best]
    intervals = paired_intervals(per_instruction, compared, best, tasks) if per_instruction else None
    sizes = [len(v[best]) for v in per_instruction.values() if best in v]
    spearman = spearman_summary({t: r["spearman"] for t, r in ok.items() if r.get("spearman")})
    if not spearman["per_task"]:
        spearman = None

    sections = [f"# Cappy sweep: Rouge-L ×100 on validation ({len(per_task)} task(s))", markdown_table(header, rows),
                f"Best baseline (by mean): {best} {stats['best_baseline_value']:.1f}"
                + (f"; Cappy − best = {stats['cappy_minus_best']:+.1f}" if stats["cappy_minus_best"] is not None
                   else "")]
    selectors = [r["training"]["selector"] for r in ok.values()
                 if isinstance((r.get("training") or {}).get("selector"), dict)]
    if selectors:
        losses = " / ".join(sorted({sel["loss"] for sel in selectors}))
        shared = all(sel.get("scope") == "all" for sel in selectors)
        sections.append("`cappy+lm+mbr` reads its Cappy score from "
                        + ("one scorer finetuned on every task's pairs together" if shared else
                           "a second scorer per task, finetuned on the same pairs")
                        + f" with the {losses} loss (`--selector-loss`"
                        + (", `--selector-scope all`" if shared else "") + "); `cappy` is the paper's MSE scorer.")
    if intervals:
        sections.append(intervals_section(intervals, best, tasks, sizes))
    zero_shot = zero_shot_section(per_instruction, tasks) if per_instruction else None
    if zero_shot is not None:
        sections.append(zero_shot[0])
        summary["zero_shot"] = zero_shot[1]
    if without:
        sections.append(f"No paired intervals for {', '.join(without)}: "
                        + ("their results were" if len(without) > 1 else "its result was")
                        + " recorded without per-instruction values (rerun to get them)"
                        + ("; the mean's interval needs every task's." if intervals else "."))
    if spearman is not None:
        sections.append(spearman_section(spearman))
    if notes:
        sections.append("Not finished:\n" + "\n".join(notes))
    text = "\n\n".join(sections) + "\n"
    write_text(out / "summary.md", text)
    write_text(out / "summary.csv", csv_text([header] + rows))
    write_text(out / "summary_ci.csv", csv_text(ci_rows(intervals, best)))
    write_text(out / "summary_spearman.csv", csv_text(spearman_rows(spearman)))
    chart = write_chart(out / "summary.png", header, rows, best, intervals)
    summary.update(
        intervals=None if intervals is None else {
            "baseline": best, "resamples": DEFAULT_RESAMPLES, "seed": DEFAULT_SEED, "confidence": 0.95,
            "tasks_without_per_instruction": without,
            "methods": {m: {"mean": interval_json(iv["mean"]),
                            "per_task": {t: interval_json(x) for t, x in iv["per_task"].items()}}
                        for m, iv in intervals.items()}},
        spearman=spearman, table=str(out / "summary.md"), csv=str(out / "summary.csv"),
        csv_ci=str(out / "summary_ci.csv"), csv_spearman=str(out / "summary_spearman.csv"), chart=str(chart))
    write_json(out / "summary.json", summary)
    log("\n" + text)
    log(f"tables: {out / 'summary.md'}, {out / 'summary.csv'}, {out / 'summary_ci.csv'}, "
        f"{out / 'summary_spearman.csv'}\nchart: {chart}")
    return summary
