"""`cappy dev-report`: a sweep's dev table and two sweeps compared on the dev instructions they share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cappy_core.selection.dev_report import compare_dev, dev_records, dev_table


def write_sweep(root, per_task: dict[str, dict[str, list[float]]], ids: dict[str, list[str]] | None = None):
    (root / "tasks").mkdir(parents=True)
    for task, values in per_task.items():
        rec = {"task": task, "status": "ok", "dev_per_instruction": values,
               "dev_instruction_ids": (ids or {}).get(task, [f"{task}/train/{i}" for i in range(len(values["beam4"]))]),
               "dev_metrics": {m: float(np.mean(v)) for m, v in values.items()}}
        (root / "tasks" / f"{task}.json").write_text(json.dumps(rec))
    (root / "tasks" / "failed.json").write_text(json.dumps({"task": "failed", "status": "failed"}))
    return root


def values(rng, n, shift):
    beam = rng.uniform(10, 40, n)
    return {"beam4": list(beam), "mbr": list(beam + 1), "cappy": list(beam + shift), "cappy+lm+mbr": list(beam + 2 * shift),
            "oracle": list(beam + 30), "random": list(beam - 5)}


def test_the_dev_table_is_the_records_means_with_selectors_against_the_best_dev_baseline(tmp_path):
    rng = np.random.default_rng(0)
    out = write_sweep(tmp_path / "a", {"t1": values(rng, 16, 3.0), "t2": values(rng, 12, 3.0)})
    records = dev_records(out)[0]
    assert sorted(records) == ["t1", "t2"]  # the failed task is left out
    (out / "tasks" / "old.json").write_text(json.dumps({"task": "old", "status": "ok", "metrics": {}}))
    assert sorted(dev_records(out)[0]) == ["t1", "t2"] and dev_records(out)[1] == ["old"]
    table = dev_table(records)
    assert table["best_baseline"] == "mbr"  # beam4 + 1
    mean_row = table["rows"][-1]
    cappy = table["header"].index("cappy")
    want = np.mean([np.mean(records[t]["dev_per_instruction"]["cappy"]) for t in ("t1", "t2")])
    assert mean_row[0] == "mean" and mean_row[cappy] == pytest.approx(round(want, 1))
    iv = table["intervals"]["cappy"]["mean"]  # cappy - mbr = +2 on every instruction
    assert (iv.mean, iv.low, iv.high) == pytest.approx((2.0, 2.0, 2.0))
    assert "vs the best dev baseline (mbr)" in table["markdown"] and "t1 16, t2 12" in table["markdown"]
    assert "- cappy: +2.0 [+2.0, +2.0]" in table["markdown"]


def test_two_sweeps_are_compared_on_the_dev_instructions_they_share(tmp_path):
    rng = np.random.default_rng(1)
    va = values(rng, 8, 1.0)
    a = write_sweep(tmp_path / "a", {"t1": va})
    # B holds out the same 8 instructions in another order, plus one A lacks; its cappy is 1.5 lower on each
    order = [3, 1, 0, 2, 7, 6, 5, 4]
    vb = {m: [v[k] for k in order] + [99.0] for m, v in va.items()}
    vb["cappy"] = [x - 1.5 for x in vb["cappy"][:-1]] + [99.0]
    b = write_sweep(tmp_path / "b", {"t1": vb}, ids={"t1": [f"t1/train/{k}" for k in order] + ["t1/train/99"]})
    cmp = compare_dev(dev_records(a)[0], dev_records(b)[0])
    assert cmp["matched"] == {"t1": (8, 8, 9)}
    d = cmp["methods"]["cappy"]["diff"]
    assert (d.mean, d.low, d.high) == pytest.approx((1.5, 1.5, 1.5))
    assert cmp["methods"]["beam4"]["diff"].mean == pytest.approx(0.0)  # aligned by id, not by position
    assert list(cmp["methods"])[:2] == ["cappy", "cappy+lm+mbr"]
    with pytest.raises(ValueError, match="share no finished task"):
        compare_dev(dev_records(a)[0], dev_records(write_sweep(tmp_path / "c", {"t9": va}))[0])


def test_outputs_without_dev_picks_say_why_and_the_command_prints_both(tmp_path, capsys):
    from jobs.dev_report import main

    with pytest.raises(FileNotFoundError, match="not a `cappy sweep` output"):
        dev_records(tmp_path / "nothing")
    (tmp_path / "old" / "tasks").mkdir(parents=True)
    (tmp_path / "old" / "tasks" / "t1.json").write_text(json.dumps({"task": "t1", "status": "ok", "metrics": {}}))
    with pytest.raises(ValueError, match="--dev-examples-per-task"):
        dev_records(tmp_path / "old")
    rng = np.random.default_rng(2)
    a = write_sweep(tmp_path / "a", {"t1": values(rng, 6, 1.0)})
    b = write_sweep(tmp_path / "b", {"t1": values(np.random.default_rng(2), 6, 0.0)})
    assert main(["--out", str(a), "--against", str(b)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# dev report: {a}") and f"## against {b}" in text
    assert "| cappy |" in text and "+1.0 [+1.0, +1.0]" in text
    assert main(["--out", str(tmp_path / "old")]) == 2 and "--dev-examples-per-task" in capsys.readouterr().err
