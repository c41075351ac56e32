"""The sweep's report (cappy_core.selection.report) on hand-made per-task numbers: the mean row, Cappy minus
the best baseline, failed tasks listed, the files written, the method order, paired intervals
against the best baseline and within-instruction Spearman (and old records without them)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from cappy_core.selection.bootstrap import paired_bootstrap
from cappy_core.selection.evaluation import (
    ScoredCandidate as C, evaluate_task, method_order, per_instruction_values, ranker_spearman,
)
from cappy_core.selection.report import markdown_table, progress_line, summary_rows, table_methods, write_reports

PER_TASK = {
    "a": {"cappy": 30.0, "beam4": 20.0, "sample": 10.0, "self_score_mean": 25.0, "oracle": 40.0, "random": 12.0},
    "b": {"cappy": 10.0, "beam4": 16.0, "sample": 8.0, "self_score_mean": 5.0, "oracle": 20.0, "random": 6.0},
}


@pytest.fixture
def charts(monkeypatch):
    """The figures the report saves (``summary.png``), in order, read back after they are written."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def chart_bars(fig) -> dict[str, dict[str, tuple[float, tuple[float, float] | None]]]:
    """The chart's left panel as drawn: ``{selector: {task: (bar length, (error bar's low, high) or None)}}``
    (the error bar's segment, in data coordinates, as matplotlib holds it)."""
    ax = fig.axes[0]
    tasks = [t.get_text() for t in ax.get_yticklabels()]
    out = {}
    for bars in ax.containers:
        if not hasattr(bars, "patches"):  # the error bars' own container; read through the bars'
            continue
        segments = bars.errorbar.lines[2][0].get_segments() if bars.errorbar is not None else [[]] * len(bars)
        rows = {}
        for patch, seg in zip(bars.patches, segments):
            task = tasks[round(patch.get_y() + patch.get_height() / 2)]
            if len(seg):
                (lo, y0), (hi, y1) = seg
                assert y0 == y1 == pytest.approx(patch.get_y() + patch.get_height() / 2)  # on its own bar
            rows[task] = (patch.get_width(), (min(lo, hi), max(lo, hi)) if len(seg) else None)
        out[bars.get_label()] = rows
    return out


def chart_means(fig) -> dict[str, float]:
    """The right panel: ``{method: bar length}``."""
    ax = fig.axes[1]
    return {label.get_text(): patch.get_width()
            for label, patch in zip(ax.get_yticklabels(), ax.containers[0].patches)}


def test_summary_rows_numbers():
    header, rows, summary = summary_rows(PER_TASK)
    assert header == ["task", "cappy", "beam4", "sample", "self_score_mean", "oracle", "random", "cappy - best"]
    assert rows[-1] == ["mean", 20.0, 18.0, 9.0, 15.0, 30.0, 9.0, 2.0]
    # per task, Cappy minus the baseline that is best on the mean (beam4), not the task's own best
    assert rows[0][-1] == 10.0 and rows[1][-1] == -6.0
    assert summary["best_baseline"] == "beam4" and summary["cappy_minus_best"] == pytest.approx(2.0)
    md = markdown_table(header, rows)
    assert md.splitlines()[-1] == "| **mean** | 20.0 | 18.0 | 9.0 | 15.0 | 30.0 | 9.0 | 2.0 |"


def test_write_reports_lists_failures_and_writes_files(tmp_path, charts):
    records = {t: {"status": "ok", "metrics": m} for t, m in PER_TASK.items()}
    records["c"] = {"status": "failed", "error": "RuntimeError: boom"}
    records["d"] = {"task": "d", "status": "missing"}
    lines = []
    summary = write_reports(tmp_path, records, log=lines.append)
    assert summary["finished"] == 2 and set(summary["failed"]) == {"c", "d"}
    md = (tmp_path / "summary.md").read_text()
    assert "- c: RuntimeError: boom" in md and "Cappy − best = +2.0" in md
    rows = list(csv.reader((tmp_path / "summary.csv").open()))
    assert [r[0] for r in rows] == ["task", "a", "b", "mean"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    # the chart: Cappy minus the best baseline (beam4) per task and on the mean, no intervals known
    (fig,) = charts
    assert chart_bars(fig) == {"cappy": {"a": (10.0, None), "b": (-6.0, None), "mean": (2.0, None)}}
    assert chart_means(fig) == dict(zip(rows[0][1:-1], map(float, rows[-1][1:-1])))
    assert json.loads((tmp_path / "summary.json").read_text())["best_baseline_value"] == 18.0


def test_nothing_finished_is_reported_not_crashed(tmp_path):
    summary = write_reports(tmp_path, {"a": {"status": "failed", "error": "x"}}, log=lambda s: None)
    assert summary["finished"] == 0 and "No task finished" in (tmp_path / "summary.md").read_text()


def test_columns_follow_evaluation_method_order():
    """One order: the table's columns are cappy_core.selection.evaluation.method_order (what evaluate_task
    reports), anything else after it alphabetically."""
    assert table_methods(set(method_order())) == method_order()
    assert table_methods({"random", "zz_new", "beam4", "cappy", "aa_new"}) == ["cappy", "beam4", "random", "aa_new",
                                                                                "zz_new"]
    group = [C(decoding=d, sample_idx=0, rouge=0.5, logprob_sum=-1.0, logprob_mean=-1.0, score=1.0, mbr=0.2,
               fused=0.1) for d in ("beam4", "sample", "temp0.9", "topk40", "topp0.95")]
    metrics = evaluate_task([group])
    header, _, _ = summary_rows({"t": metrics})
    assert header[1:-1] == list(metrics) == method_order()


def test_progress_line():
    rec = {"metrics": {"cappy": 31.25, "beam4": 20.0, "oracle": 50.0}, "wall_s": 12.4}
    assert progress_line("tense", rec) == "tense: cappy 31.2, beam4 20.0, oracle 50.0 (12s)"


DECODINGS = [("beam4", 0)] + [(d, i) for d in ("sample", "temp0.9") for i in range(3)]


def task_record(seed, n, *, mbr_skill=0.6):
    """A finished task's record as the sweep writes it, from ``n`` random instructions: MBR
    tracks Rouge-L with weight ``mbr_skill``, Cappy a little less, the fused value between."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        g = []
        for d, i in DECODINGS:
            r = rng.random()
            g.append(C(decoding=d, sample_idx=i, rouge=r, logprob_sum=rng.uniform(-9, 0),
                       logprob_mean=rng.uniform(-2, 0), score=0.4 * r + rng.random(),
                       mbr=mbr_skill * r + rng.random(), fused=0.8 * r + rng.random()))
        groups.append(g)
    return {"status": "ok", "metrics": evaluate_task(groups), "per_instruction": per_instruction_values(groups),
            "spearman": ranker_spearman(groups), "wall_s": 1.0}


def test_report_has_paired_intervals_and_spearman(tmp_path, charts):
    records = {"a": task_record(1, 30), "b": task_record(2, 20)}
    summary = write_reports(tmp_path, records, log=lambda s: None)
    best = summary["best_baseline"]
    assert best == "mbr"  # MBR counts as a baseline
    iv = summary["intervals"]
    assert iv["baseline"] == "mbr" and iv["resamples"] >= 1000 and iv["tasks_without_per_instruction"] == []
    # every method but the bounds and the best baseline itself, in the table's order
    assert list(iv["methods"]) == ["cappy", "cappy+lm+mbr", "beam4", "sample", "temp0.9", "self_score_sum",
                                   "self_score_mean"]
    # the interval is the bootstrap's on the per-instruction values; its point is the table's difference
    expected, per = paired_bootstrap({t: (r["per_instruction"]["cappy"], r["per_instruction"]["mbr"])
                                      for t, r in records.items()})
    cappy = iv["methods"]["cappy"]
    assert cappy["mean"] == pytest.approx({**expected.as_dict(), "half_width": expected.half_width})
    assert cappy["per_task"]["b"]["low"] == pytest.approx(per["b"].low)
    assert cappy["mean"]["mean"] == pytest.approx(summary["cappy_minus_best"])
    assert cappy["mean"]["low"] < cappy["mean"]["mean"] < cappy["mean"]["high"]
    md = (tmp_path / "summary.md").read_text()
    assert "## vs best baseline (mbr)" in md
    assert "second scorer" not in md  # the fused row uses the cappy row's scorer here
    records["a"]["training"] = {"selector": {"loss": "listwise"}}
    write_reports(tmp_path / "sel", records, log=lambda s: None)
    assert "a second scorer per task, finetuned on the same pairs with the listwise loss (`--selector-loss`)" in (
        tmp_path / "sel" / "summary.md").read_text()
    for r in records.values():  # one selector scorer for every task (--selector-scope all)
        r["training"] = {"selector": {"loss": "listwise", "scope": "all"}}
    write_reports(tmp_path / "one", records, log=lambda s: None)
    assert "from one scorer finetuned on every task's pairs together with the listwise loss (`--selector-loss`, " \
        "`--selector-scope all`)" in (tmp_path / "one" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cappy |"))
    assert f"[{expected.low:+.1f}, {expected.high:+.1f}]" in row and row.count("[") == 3  # mean, a, b
    # 20–30 instructions per task are far too few here: the report says what they cannot resolve
    assert expected.half_width > 1.0
    assert (f"20–30 validation instructions per task cannot resolve differences below ±{expected.half_width:.1f} "
            "points") in md
    assert "## Within-instruction Spearman" in md
    ci = list(csv.DictReader((tmp_path / "summary_ci.csv").open()))
    assert {(r["method"], r["task"]) for r in ci} == {(m, t) for m in iv["methods"] for t in ("a", "b", "mean")}
    mean_row = next(r for r in ci if r["method"] == "cappy" and r["task"] == "mean")
    assert mean_row["baseline"] == "mbr" and float(mean_row["low"]) == pytest.approx(expected.low, abs=0.006)
    rho = list(csv.DictReader((tmp_path / "summary_spearman.csv").open()))
    a_cappy = next(r for r in rho if r["task"] == "a" and r["ranker"] == "cappy")
    assert float(a_cappy["spearman"]) == pytest.approx(records["a"]["spearman"]["cappy"]["mean"], abs=0.0006)
    assert {r["ranker"] for r in rho} == {"cappy", "cappy+lm+mbr", "self_score_sum", "self_score_mean", "mbr"}
    js = json.loads((tmp_path / "summary.json").read_text())
    assert js["intervals"]["methods"]["cappy"]["mean"] == pytest.approx(cappy["mean"])
    assert js["spearman"]["per_task"]["b"]["mbr"]["instructions"] == 20
    assert js["spearman"]["mean"]["mbr"]["tasks"] == 2
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    # the chart's error bars are the intervals: each selector's bar is its paired difference from the
    # best baseline, its error bar the interval's [low, high], per task and on the mean
    drawn = chart_bars(charts[0])
    assert list(drawn) == ["cappy", "cappy+lm+mbr"]
    for m, bars in drawn.items():
        want = {**iv["methods"][m]["per_task"], "mean": iv["methods"][m]["mean"]}
        assert list(bars) == ["a", "b", "mean"]
        for task, (length, err) in bars.items():
            assert length == pytest.approx(want[task]["mean"], abs=1e-9), (m, task)
            assert err == pytest.approx((want[task]["low"], want[task]["high"]), abs=1e-9), (m, task)
    assert drawn["cappy"]["mean"][1] == pytest.approx((expected.low, expected.high), abs=1e-9)
    # the main table keeps its meaning: cappy minus the best baseline (here MBR)
    main = list(csv.reader((tmp_path / "summary.csv").open()))
    assert main[0][-1] == "cappy - best" and float(main[-1][-1]) == round(summary["cappy_minus_best"], 1)


def test_no_resolution_sentence_when_the_interval_is_narrow(tmp_path):
    rec = task_record(3, 40)
    pi = rec["per_instruction"]
    pi["cappy"] = [v + 0.5 for v in pi["mbr"]]  # a constant shift: a zero-width interval
    write_reports(tmp_path, {"a": rec}, log=lambda s: None)
    md = (tmp_path / "summary.md").read_text()
    assert "| cappy | +0.5 | [+0.5, +0.5] | 0.0 |" in md and "cannot resolve" not in md


def test_old_records_without_per_instruction_still_report(tmp_path, charts):
    summary = write_reports(tmp_path, {t: {"status": "ok", "metrics": m} for t, m in PER_TASK.items()},
                            log=lambda s: None)
    assert summary["intervals"] is None and summary["spearman"] is None
    md = (tmp_path / "summary.md").read_text()
    assert "No paired intervals for a, b" in md and "vs best baseline" not in md and "Cappy − best = +2.0" in md
    assert list(csv.reader((tmp_path / "summary_ci.csv").open())) == [
        ["method", "baseline", "task", "diff", "low", "high", "half_width"]]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert chart_bars(charts[0]) == {"cappy": {"a": (10.0, None), "b": (-6.0, None), "mean": (2.0, None)}}
    # one old record among new ones: per-task intervals where known, no mean interval
    new = task_record(4, 10)
    old = {k: v for k, v in task_record(5, 10).items() if k not in ("per_instruction", "spearman")}
    summary = write_reports(tmp_path, {"new": new, "old": old}, log=lambda s: None)
    cappy = summary["intervals"]["methods"]["cappy"]
    assert cappy["mean"] is None and list(cappy["per_task"]) == ["new"]
    assert summary["intervals"]["tasks_without_per_instruction"] == ["old"]
    md = (tmp_path / "summary.md").read_text()
    assert "No paired intervals for old" in md and "the mean's interval needs every task's" in md
    assert list(summary["spearman"]["per_task"]) == ["new"]
    # an error bar where the interval is known (new), none where it is not (old, and so the mean)
    drawn = chart_bars(charts[1])
    assert list(drawn) == ["cappy", "cappy+lm+mbr"]
    for m, bars in drawn.items():
        known = summary["intervals"]["methods"][m]["per_task"]["new"]
        assert bars["new"][0] == pytest.approx(known["mean"], abs=1e-9), m
        assert bars["new"][1] == pytest.approx((known["low"], known["high"]), abs=1e-9), m
        assert bars["old"][1] is None and bars["mean"][1] is None, m
