"""What a sweep's choices rest on: every method's Rouge-L on the held-out *train* instructions (dev).

Each sweep task holds out the last ``dev_examples_per_task`` sampled train instructions (the
fused selector's weights are fitted there) and records every method's pick on them per instruction
(``dev_per_instruction``, ``dev_instruction_ids`` in ``OUT/tasks/<task>.json``). :func:`dev_table`
is the dev counterpart of the validation table, with each selector's paired interval against the
best dev baseline; :func:`compare_dev` sets two sweeps side by side on the dev instructions they
share (e.g. ``--sampling.prompt-format plain`` against ``chat``, or two selector losses), method by
method, with paired intervals. With ``cappy sweep --zero-shot``, the rows ``cappy-0shot`` and
``fused-0shot`` are there too: each task's dev picked by a selector that never saw the task,
what a change to that recipe is judged on. Neither reads validation: a setting chosen from these figures was
not chosen on the data the final table reports. ``cappy dev-report`` prints both. Tested in
``tests/core/test_dev_report.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cappy_core.selection.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, paired_bootstrap
from cappy_core.selection.evaluation import BOUNDS, SELECTORS
from cappy_core.selection.report import interval_cell, markdown_table, paired_intervals, summary_rows
from cappy_core.selection.task_results import read_result

__all__ = ["compare_dev", "dev_records", "dev_table"]


def dev_records(out: str | Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``({task: record}, tasks without)``: the finished tasks in a sweep's ``OUT/tasks`` that
    recorded dev picks, and the finished ones that did not. A folder with none is an error that
    says why (no sweep there, no dev held out, or results from before dev picks were recorded)."""
    folder = Path(out).expanduser() / "tasks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{out}: no tasks/ folder (not a `cappy sweep` output)")
    records, without = {}, []
    for path in sorted(folder.glob("*.json")):
        rec = read_result(folder, path.stem)
        if rec.get("status") != "ok":
            continue
        if rec.get("dev_per_instruction") and rec.get("dev_instruction_ids"):
            records[rec.get("task", path.stem)] = rec
        else:
            without.append(path.stem)
    if records:  # with --zero-shot, each task's picks by a selector that never saw it, on its dev too
        from cappy_core.selection.zero_shot import with_zero_shot

        records = with_zero_shot(folder, records)
    if not records:
        why = (f"{len(without)} finished task(s) recorded no dev picks ({', '.join(without[:6])}): run the sweep with "
               "--dev-examples-per-task N (the local preset holds out 16), or rerun it (results from before dev "
               "picks were recorded)") if without else "no finished task"
        raise ValueError(f"{out}: {why}")
    return records, without


def dev_table(records: Mapping[str, Mapping[str, Any]], *, resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The dev table (rows: tasks, then the mean; Rouge-L ×100) and each selector's paired interval
    against the best dev baseline: ``{"header", "rows", "best_baseline", "intervals", "markdown"}``."""
    per_task = {t: r["dev_metrics"] for t, r in records.items()}
    header, rows, stats = summary_rows(per_task)
    best = stats["best_baseline"]
    tasks = list(per_task)
    compared = [m for m in SELECTORS if m in stats["mean"]] + [m for m in stats["mean"]
                                                             if m not in SELECTORS and m not in BOUNDS and m != best]
    intervals = paired_intervals({t: r["dev_per_instruction"] for t, r in records.items()}, compared, best, tasks,
                                 resamples=resamples, seed=seed)
    sizes = {t: len(r["dev_instruction_ids"]) for t, r in records.items()}
    lines = [f"Dev (held-out train instructions: {', '.join(f'{t} {n}' for t, n in sizes.items())}), "
             "Rouge-L ×100:", "", markdown_table(header, rows), "",
             f"vs the best dev baseline ({best}), mean over tasks, paired 95% interval:", ""]
    lines += [f"- {m}: {interval_cell(iv['mean']) or 'n/a (not every task)'}" for m, iv in intervals.items()]
    return {"header": header, "rows": rows, "best_baseline": best, "intervals": intervals,
            "markdown": "\n".join(lines)}


def compare_dev(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]], *, names=("A", "B"),
                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """A − B per method on the dev instructions both sweeps hold out for the same tasks (matched by
    instruction id), mean over tasks with its paired 95% interval: ``{"tasks", "matched",
    "methods": {method: {"a", "b", "diff": Interval}}, "markdown"}``. No common task is an error."""
    tasks = sorted(set(a) & set(b))
    if not tasks:
        raise ValueError(f"{names[0]} and {names[1]} share no finished task with dev picks "
                         f"({sorted(a)} vs {sorted(b)})")
    aligned: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    matched = {}
    for t in tasks:
        ia = {i: k for k, i in enumerate(a[t]["dev_instruction_ids"])}
        ib = {i: k for k, i in enumerate(b[t]["dev_instruction_ids"])}
        common = [i for i in a[t]["dev_instruction_ids"] if i in ib]
        matched[t] = (len(common), len(ia), len(ib))
        if not common:
            continue
        for m in set(a[t]["dev_per_instruction"]) & set(b[t]["dev_per_instruction"]):
            va, vb = a[t]["dev_per_instruction"][m], b[t]["dev_per_instruction"][m]
            aligned.setdefault(m, {})[t] = ([va[ia[i]] for i in common], [vb[ib[i]] for i in common])
    if not aligned:
        raise ValueError(f"{names[0]} and {names[1]} hold out no common dev instruction: other samples or caps")
    methods: dict[str, dict[str, Any]] = {}
    for m, pairs in aligned.items():
        if set(pairs) != set(t for t in tasks if matched[t][0]):
            continue  # a method one of them lacks on some task: its mean would be over other tasks
        diff, _ = paired_bootstrap(pairs, resamples=resamples, seed=seed)
        mean = lambda k: sum(sum(p[k]) / len(p[k]) for p in pairs.values()) / len(pairs)  # noqa: E731
        methods[m] = {"a": mean(0), "b": mean(1), "diff": diff}
    from cappy_core.selection.report import table_methods

    order = table_methods(set(methods))
    lines = [f"{names[0]} − {names[1]} on the dev instructions both hold out "
             f"({', '.join(f'{t} {matched[t][0]}' for t in tasks)}), Rouge-L ×100, mean over tasks:", "",
             f"| method | {names[0]} | {names[1]} | {names[0]} − {names[1]} [95% CI] |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {methods[m]['a']:.1f} | {methods[m]['b']:.1f} | {interval_cell(methods[m]['diff'])} |"
              for m in order]
    return {"tasks": tasks, "matched": matched, "methods": {m: methods[m] for m in order}, "markdown": "\n".join(lines)}
