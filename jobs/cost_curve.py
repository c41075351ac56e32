"""``cappy cost-curve``: what selection gives for how many candidates, from a finished sweep.

    cappy cost-curve --out ~/cappy_runs/sweep-local

For k = 1, 2, 4, 8, 17 candidates (taken in generation order: beam4, then one sample of each
sampling decoding in turn), every task's validation Rouge-L of beam4, MBR, Cappy and the fused
selector picking among the first k, mean over tasks, each with its paired 95% interval against
beam4 alone; then the adaptive rule (stop generating once the fused margin reaches ``tau``,
fitted on the tasks' dev instructions) with its Rouge-L and mean candidates generated
(:mod:`cappy_core.selection.cost_curve`). Writes ``OUT/cost_curve.{md,csv,png,json}``; the sweep
writes them too, after its summary. Reads the tasks' scored tables (``OUT/tasks/<task>/
{dev,validation}_scored.parquet``) and fused weights (``OUT/tasks/<task>.json``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from cappy_core.config import SettingError
from jobs.runtime import job_main


@dataclass
class CostCurveConfig:
    out: Optional[str] = field(default=None, metadata={"metavar": "OUT", "help": "a `cappy sweep` output folder"})
    tolerance: float = field(default=0.5, metadata={
        "help": "the adaptive rule may lose at most this many Rouge-L points on dev against all 17 candidates"})


def write_cost_curve(out: str | Path, records: Mapping[str, Mapping[str, Any]], tolerance: float = 0.5,
                     log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The cost curve and the adaptive rule of the finished tasks with fused weights and scored
    tables, written under ``out``; None (and nothing written) when no task has them."""
    import math

    import numpy as np
    import pyarrow.parquet as pq

    from cappy_core.io import write_json, write_text
    from cappy_core.selection.bootstrap import paired_bootstrap
    from cappy_core.selection.cost_curve import COUNTS, CURVE_METHODS, adaptive_picks, curve, fit_tau
    from cappy_core.selection.evaluation import FUSED
    from cappy_core.selection.report import csv_text, interval_cell, interval_json

    out = Path(out)
    tasks = [t for t, r in sorted(records.items()) if r.get("status") == "ok" and r.get("fused_weights")
             and (out / "tasks" / t / "validation_scored.parquet").is_file()
             and (out / "tasks" / t / "dev_scored.parquet").is_file()]
    if not tasks:
        return None
    weights = {t: records[t]["fused_weights"] for t in tasks}
    val = {t: pq.read_table(out / "tasks" / t / "validation_scored.parquet") for t in tasks}
    dev = {t: pq.read_table(out / "tasks" / t / "dev_scored.parquet") for t in tasks}
    curves = {t: curve(val[t], weights[t]) for t in tasks}
    rows, points, intervals = [["method", "k", "rouge_l", "diff_vs_beam4", "low", "high"]], {}, {}
    for m in CURVE_METHODS:
        for k in COUNTS:
            mean = float(np.mean([np.mean(curves[t][m][k]) for t in tasks]))
            iv = intervals[m, k] = paired_bootstrap({t: (curves[t][m][k], curves[t]["beam4"][1]) for t in tasks})[0]
            points[f"{m}@{k}"] = {"rouge_l": mean, "vs_beam4": interval_json(iv)}
            rows.append([m, k, round(mean, 2), round(iv.mean, 2), round(iv.low, 2), round(iv.high, 2)])
    fit = fit_tau([(dev[t], weights[t]) for t in tasks], tolerance)
    runs = {t: adaptive_picks(val[t], weights[t], fit["tau"]) for t in tasks}
    full = {t: curves[t][FUSED][COUNTS[-1]] for t in tasks}
    iv, _ = paired_bootstrap({t: (runs[t][0], full[t]) for t in tasks})
    cands = float(np.mean([np.mean(runs[t][1]) for t in tasks]))
    tau = None if math.isinf(fit["tau"]) else fit["tau"]  # JSON has no inf: None = never stop early
    adaptive = {"tau": tau, "dev": {**fit, "tau": tau}, "rouge_l": float(np.mean([np.mean(runs[t][0]) for t in tasks])),
                "mean_candidates": cands, "fraction_of_candidates": cands / COUNTS[-1], "vs_fused_all": interval_json(iv)}
    md = [f"# Rouge-L ×100 against candidates generated ({len(tasks)} task(s), validation)", "",
          "| method | " + " | ".join(f"k={k}" for k in COUNTS) + " |", "|---" + "|---:" * len(COUNTS) + "|"]
    md += ["| " + m + " | " + " | ".join(f"{points[f'{m}@{k}']['rouge_l']:.1f}" for k in COUNTS) + " |"
           for m in CURVE_METHODS]
    md += ["", "Each point − beam4 alone, paired 95% interval:", ""]
    md += [f"- {m} @ {k}: {interval_cell(intervals[m, k])}" for m in CURVE_METHODS[1:] for k in COUNTS]
    rule = "never stop early (no margin kept dev within the tolerance)" if tau is None else f"tau {tau}"
    md += ["", f"Adaptive rule ({rule}, fitted on dev: {fit['dev_rouge']:.1f} vs {fit['dev_full']:.1f} with every "
           f"candidate, tolerance {tolerance}): {adaptive['rouge_l']:.1f} with {cands:.1f} candidates on average "
           f"({100 * adaptive['fraction_of_candidates']:.0f}% of {COUNTS[-1]}); − the fused pick of all "
           f"{COUNTS[-1]}: {interval_cell(iv)}"]
    write_text(out / "cost_curve.md", "\n".join(md) + "\n")
    write_text(out / "cost_curve.csv", csv_text(rows))
    result = {"tasks": tasks, "counts": list(COUNTS), "points": points, "adaptive": adaptive,
              "chart": str(_chart(out / "cost_curve.png", points, adaptive))}
    write_json(out / "cost_curve.json", result)
    log("\n".join(md) + f"\ncost curve: {out / 'cost_curve.md'}, chart: {result['chart']}")
    return result


def _chart(path: Path, points: Mapping[str, Any], adaptive: Mapping[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cappy_core.io import atomic_path
    from cappy_core.selection.cost_curve import COUNTS, CURVE_METHODS

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for m in CURVE_METHODS:  # error bars: the 95% interval of the point's difference from beam4 alone
            ys = [points[f"{m}@{k}"]["rouge_l"] for k in COUNTS]
            ivs = [points[f"{m}@{k}"]["vs_beam4"] for k in COUNTS]
            err = [[iv["mean"] - iv["low"] for iv in ivs], [iv["high"] - iv["mean"] for iv in ivs]]
            ax.errorbar(COUNTS, ys, yerr=err, marker="o", capsize=3, label=m)
        ax.scatter([adaptive["mean_candidates"]], [adaptive["rouge_l"]], marker="*", s=160, color="black",
                   label="adaptive (fused)", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(COUNTS, [str(k) for k in COUNTS])
        ax.set_xlabel("candidates generated")
        ax.set_ylabel("Rouge-L ×100 (validation, mean over tasks)")
        ax.set_title("error bars: 95% interval of the difference from beam4", fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def run(cfg: CostCurveConfig) -> None:
    from cappy_core.selection.task_results import read_result

    if not cfg.out:
        raise SettingError("out", "give the sweep output to read")
    folder = Path(cfg.out).expanduser() / "tasks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{cfg.out}: no tasks/ folder (not a `cappy sweep` output)")
    records = {p.stem: read_result(folder, p.stem) for p in sorted(folder.glob("*.json"))}
    if write_cost_curve(Path(cfg.out).expanduser(), records, cfg.tolerance) is None:
        raise ValueError(f"{cfg.out}: no finished task has fused weights and scored dev and validation tables "
                         "(the sweep needs --dev-examples-per-task)")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(CostCurveConfig, lambda cfg, _: run(cfg), job="cost_curve", module="jobs.cost_curve", argv=argv,
                    prog=prog, epilog="Example:\n  cappy cost-curve --out ~/cappy_runs/sweep-local",
                    description="Rouge-L of beam4, MBR, Cappy and the fused selector against the number of "
                                "candidates generated (1, 2, 4, 8, 17), with paired intervals, and an adaptive "
                                "rule fitted on dev that stops generating once the fused pick is clear.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
