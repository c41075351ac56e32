"""`cappy generator train` end to end (subprocess, tiny settings), `ensure_generator`, and the
saved folder in transformers and, where importable, vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

TASKS = ["standin_tense", "standin_rephrase"]  # stand-in tasks (tests/fake_release.py), as --task-dir


@pytest.fixture(scope="module")
def tiny(standin_tasks):
    return ["--preset", "tiny", "--tasks", *TASKS, "--eval-tasks", *TASKS, "--task-dir", str(standin_tasks),
            "--eval-examples", "4", "--threads", "1"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jobs.train_generator", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("gen") / "tiny"
    proc = run(*tiny, "--updates", "15", "--time-budget-s", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_cli_trains_saves_and_reports(trained):
    out, proc = trained
    meta = json.loads((out / "cappy_generator.json").read_text())
    assert meta["training"]["updates"] == 15 and meta["training"]["tokens_per_s"] > 0
    tr = meta["training"]  # useful training FLOP/s over the matmul rate at the same threads
    assert tr["fraction_of_bound"] == pytest.approx(tr["tokens_per_s"] * tr["train_flops_per_token"] / tr["matmul_flops"])
    assert 0 < tr["fraction_of_bound"] < 2 and "of the matmul bound" in proc.stdout
    assert meta["tasks"] == sorted(TASKS) and meta["config"]["hidden_size"] == 64
    assert meta["max_prompt_tokens"] == 96 and meta["prompt_format"] == "<s>{instruction}\\n{response}</s>"
    ev = meta["eval"]
    assert set(ev["tasks"]) == set(TASKS) and ev["num_examples"] == 8
    assert 0 <= ev["greedy_rouge_l"] <= 100 and ev["oracle_rouge_l"] >= ev["greedy_rouge_l"]
    assert "greedy Rouge-L" in proc.stdout and "tokens/s" in proc.stdout and "final loss" in proc.stdout
    assert "training generator" in proc.stderr  # the progress bar
    assert not list(out.parent.glob("tiny.*"))  # written atomically: no temp folder left
    # a model card: license, no hub dataset for these --task-dir tasks, the check's greedy Rouge-L per task
    import yaml

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert (front["license"], front["pipeline_tag"], "datasets" in front) == ("apache-2.0", "text-generation", False)
    results = {r["dataset"]["config"]: r["metrics"][0]["value"] for r in front["model-index"][0]["results"]}
    assert results == {t: pytest.approx(ev["tasks"][t]["greedy_rouge_l"], abs=1e-4) for t in TASKS}
    assert "| updates | 15 (" in card and "| training data | tasks: standin_rephrase, standin_tense |" in card


def test_the_check_reads_held_out_train_examples_never_validation(standin_tasks):
    """The quality check's examples are each eval task's last train examples (at most a fifth),
    and no training example shares their instruction; validation is not read."""
    from cappy_core.generation.embedded_training import load_generator_data

    data = load_generator_data(TASKS, eval_tasks=TASKS[:1], eval_examples=4, task_dir=[str(standin_tasks)])
    splits = splits_of(standin_tasks, TASKS[0])
    held, train = data.eval_by_task[TASKS[0]], data.train_by_task[TASKS[0]]
    assert held == splits["train"][-4:] and len(train) == len(splits["train"]) - 4
    assert not {e.instruction for e in held} & {e.instruction for e in train}
    assert not {e.instruction for e in held} & {e.instruction for e in splits["validation"]}
    assert data.train_by_task[TASKS[1]] == splits_of(standin_tasks, TASKS[1])["train"]  # not an eval task: whole
    few = load_generator_data(TASKS, eval_tasks=TASKS[:1], eval_examples=1000, task_dir=[str(standin_tasks)])
    assert len(few.eval_by_task[TASKS[0]]) == len(splits["train"]) // 5


def splits_of(task_dir, task: str) -> dict:
    from cappy_core.data.catalog import TaskCatalog

    return TaskCatalog.open(None, [str(task_dir)]).load(task)


def test_saved_generator_loads_with_auto_classes(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cappy_core.generation.embedded_model import prompt_text

    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    # the BPE stops below the preset's 512 when the corpus runs out of merges; the model is sized to it
    assert type(model).__name__ == "LlamaForCausalLM" and 256 < len(tok) == model.config.vocab_size <= 512
    enc = tok([prompt_text("Q: I walk. Change tense to PAST:\nA:")], return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), str)


def test_rerun_reuses_and_force_retrains(trained, tiny):
    out, _ = trained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    proc = run(*tiny, "--updates", "3", "--time-budget-s", "0", "--out", str(out))
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_generator_reuses_an_existing_folder(trained, monkeypatch):
    import jobs.train_generator as tg

    out, _ = trained

    def boom(*a, **k):
        raise AssertionError("must not retrain")

    monkeypatch.setattr(tg, "train_generator", boom)
    logs = []
    assert tg.ensure_generator(out, log=logs.append) == out
    assert "using the generator" in logs[0]


def test_ensure_generator_trains_when_missing(tmp_path, standin_tasks):
    import jobs.train_generator as tg
    from cappy_core.config import load_yaml
    from jobs.cli import presets

    tiny = load_yaml(tg.GeneratorConfig, presets("generator")["tiny"])
    cfg = tg.GeneratorConfig(**{**tiny, "tasks": ["standin_tense"], "task_dir": [str(standin_tasks)], "updates": 3, "time_budget_s": 0,
                                "eval_examples": 0, "threads": 1})
    path = tg.ensure_generator(tmp_path / "g", config=cfg, log=lambda s: None)
    from cappy_core.generation.embedded_model import generator_metadata, is_generator_dir

    assert is_generator_dir(path) and generator_metadata(path)["training"]["updates"] == 3


@pytest.mark.slow
def test_time_budget_stops_training_gracefully(tmp_path, standin_tasks):
    out = tmp_path / "budget"
    no_fixed_updates = tmp_path / "budget.yaml"
    no_fixed_updates.write_text("updates: null\n")  # size the run to the budget, not to --updates
    proc = run("--preset", "tiny", "--config", str(no_fixed_updates), "--task-dir", str(standin_tasks),
               "--tasks", "standin_tense", "--eval-tasks", "standin_tense",
               "--eval-examples", "4",
               "--threads", "1", "--time-budget-s", "20", "--eval-reserve-s", "6", "--calibration-updates", "5",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "cappy_generator.json").read_text())
    tr = meta["training"]
    assert meta["prep_seconds"] + tr["seconds"] <= 14 + 2  # stopped by the training deadline (budget - reserve)
    assert tr["planned_updates"] >= tr["updates"]
    if tr["updates"] > 5:  # on a very busy machine data preparation can eat the whole window
        assert "calibration: 5 warmup updates" in proc.stdout
    assert meta["total_seconds"] < 20 + 15  # the check may overrun its reserve on a busy machine


def test_presets_yaml_and_flags_compose(tmp_path):
    from jobs.train_generator import GeneratorConfig, parse_config

    cfg = parse_config(["--preset", "tiny", "--hidden-size", "32"])
    assert cfg.hidden_size == 32 and cfg.vocab_size == 512
    y = tmp_path / "c.yaml"
    y.write_text("vocab_size: 300\nlr: 0.01\n")
    cfg = parse_config(["--preset", "tiny", "--config", str(y), "--lr", "0.02"])
    assert (cfg.vocab_size, cfg.lr, cfg.num_layers) == (300, 0.02, 2)
    assert parse_config([]) == parse_config(["--preset", "cpu"]) == GeneratorConfig()


def test_clear_errors(tmp_path, standin_tasks):
    proc = run("--tasks", "tens", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "unknown task 'tens'" in proc.stderr and "tense" in proc.stderr
    (tmp_path / "file").write_text("x")
    tense = ["--tasks", "standin_tense", "--task-dir", str(standin_tasks)]
    proc = run(*tense, "--out", str(tmp_path / "file" / "g"))
    assert proc.returncode == 2 and "cannot write the generator" in proc.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = run(*tense, "--out", str(tmp_path / "mine"), "--force")
    assert proc.returncode == 2 and "refusing" in proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    proc = run("--hidden-size", "65", "--num-heads", "2", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "divisible" in proc.stderr
    proc = run("--loss-on", "prompt")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_cappy_cli_dispatches():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "generator", "train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--time-budget-s" in proc.stdout and "cappy generator train" in proc.stdout


@pytest.mark.slow
def test_loads_in_vllm(trained):
    pytest.importorskip("vllm")
    out, _ = trained
    script = textwrap.dedent(f"""
        import json
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from cappy_core.generation.embedded_model import prompt_text

        if __name__ == "__main__":
            path = {str(out)!r}
            tok = AutoTokenizer.from_pretrained(path)
            llm = LLM(model=path, gpu_memory_utilization=0.1, max_model_len=256, dtype="float32", seed=0)
            prompts = [prompt_text("Q: I walk. Change tense to PAST:\\nA:"), prompt_text("Sorted:")]
            outs = llm.generate(prompts, SamplingParams(n=2, max_tokens=8, logprobs=0, seed=0))
            res = [dict(ids=list(o.prompt_token_ids), expected=tok(p)["input_ids"],
                        texts=[c.text for c in o.outputs], lp=[c.cumulative_logprob for c in o.outputs])
                   for p, o in zip(prompts, outs)]
            print("RESULT" + json.dumps(res))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    for r in res:
        assert r["ids"] == r["expected"]  # same prompt tokens (BOS included) as transformers
        assert len(r["texts"]) == 2 and all(lp is not None and lp <= 0 for lp in r["lp"])
