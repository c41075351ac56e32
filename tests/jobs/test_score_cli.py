"""``cappy score`` as a user runs it: a subprocess, ``python -m jobs.score``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_score(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.score", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_table_shows_every_score_and_the_pick():
    p = run_score("--scorer", "minilm", "--instruction", "What colour is the sky?",
                  "--response", "blue", "--response", "a green banana")
    assert p.returncode == 0, p.stderr
    rows = [m.groups() for m in re.finditer(r"^(\*?)\s+(\d+)\s+(-?\d+\.\d+)\s+(.*)$",
                                             p.stdout, re.MULTILINE)]
    assert [(int(i), text) for _, i, _, text in rows] == [(0, "blue"), (1, "a green banana")]
    scores = [float(s) for _, _, s, _ in rows]
    pick = 0 if scores[0] >= scores[1] else 1
    assert [star for star, *_ in rows] == ["*" if i == pick else "" for i in range(2)]
    assert p.stdout.splitlines()[-1].startswith(f"pick: {pick} ")
    assert "meaningless until it is trained" in p.stderr  # the untrained head is announced


def test_json_output_parses_and_agrees_with_config_file(tmp_path):
    cfg = tmp_path / "score.yaml"
    cfg.write_text("scorer: minilm\ninstruction: 'Add 2 and 2.'\nresponse: ['4', 'four', '5']\n")
    p = run_score("--config", str(cfg), "--json", "--dtype", "bfloat16")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["responses"] == ["4", "four", "5"] and len(out["scores"]) == 3
    assert out["pick"] == max(range(3), key=lambda i: (out["scores"][i], -i))
    assert out["best_response"] == out["responses"][out["pick"]]


def test_no_responses_is_a_clear_usage_error():
    p = run_score("--instruction", "What colour is the sky?")
    assert p.returncode == 2
    assert p.stderr.startswith("error: nothing to score") and "at least one --response" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    p = run_score("--scorer", str(tmp_path / "missing"), "--instruction", "x", "--response", "y")
    assert p.returncode == 2
    assert "not found" in p.stderr and "missing" in p.stderr and "Traceback" not in p.stderr


def test_pairs_file_scores_every_row(tmp_path):
    import numpy as np

    from cappy_core.scorer.model import Scorer

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"instruction": "What colour is the sky?", "response": "blue"},
            {"instruction": "Add 2 and 2.", "response": "four"},
            {"instruction": "What colour is the sky?", "response": "a green banana"},
            {"instruction": "Add 2 and 2.", "response": "The capital of France is Paris."}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    p = run_score("--pairs", str(pairs), "--out", str(out), "--device", "cpu")
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["instruction"], g["response"]) for g in got] == [
        (r["instruction"], r["response"]) for r in rows]
    # each row's score is the library's for that pair: the CLI's defaults (minilm, seed 0, fp32) in-process
    ref = Scorer.from_pretrained("minilm", device="cpu", seed=0).score(
        [r["instruction"] for r in rows], [r["response"] for r in rows])
    assert np.ptp(ref) > 1e-3  # the pairs score differently, so a shuffled or constant column would not pass
    np.testing.assert_allclose([g["score"] for g in got], ref, atol=1e-6, rtol=0)
