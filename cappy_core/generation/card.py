"""The embedded generator's model card (``README.md`` in its folder), from its
``cappy_generator.json``: what it is, what it was trained on and how fast, its check, how to load it.

The front matter carries ``license`` (the project's, Apache-2.0: the weights are trained from
scratch here, on BIG-Bench, also Apache-2.0), ``datasets`` when a training task is BIG-Bench's,
and a ``model-index`` with the check's greedy Rouge-L per task. Tested in
``tests/jobs/test_train_generator.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml


def generator_card(meta: Mapping[str, Any], name: str) -> str:
    from cappy_core.data.tasks import is_bigbench_task
    from cappy_core.scorer.checkpoint import BIGBENCH_DATASET, index_dataset

    model, training, check = meta.get("model") or {}, meta.get("training") or {}, meta.get("eval") or {}
    tasks = list(meta.get("tasks") or [])
    front: dict[str, Any] = {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": ["cappy", "llama", "big-bench"]}
    if any(map(is_bigbench_task, tasks)):
        front["datasets"] = [BIGBENCH_DATASET]
    per_task = {t: r for t, r in (check.get("tasks") or {}).items() if isinstance(r.get("greedy_rouge_l"), (int, float))}
    if per_task:
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "greedy answer"},
            "dataset": index_dataset(t, "train"),  # the check's train examples, held out of training
            "metrics": [{"type": "rouge", "name": f"Rouge-L (x100), greedy, {r.get('examples', '?')} held-out train "
                                                  "examples",
                         "value": round(float(r["greedy_rouge_l"]), 4)}],
            "source": {"name": "cappy generator train (check)", "url": "https://arxiv.org/abs/2311.06720"},
        } for t, r in per_task.items()]}]
    params = model.get("parameters")
    rows = [("architecture", f"{model.get('architecture', 'LlamaForCausalLM')}, {model.get('num_layers', '?')} layers x "
                             f"{model.get('hidden_size', '?')}, {model.get('num_heads', '?')} heads, vocabulary "
                             f"{model.get('vocab_size', '?')} (byte-level BPE)"
                             + (f", {params / 1e6:.1f}M parameters" if params else "")),
            ("prompt format", f"`{meta.get('prompt_format', '?')}`"),
            ("training data", (("BIG-Bench" if tasks and all(map(is_bigbench_task, tasks)) else "tasks") + ": "
                               + ", ".join(tasks[:12]) + (f" and {len(tasks) - 12} more" if len(tasks) > 12 else ""))
             if tasks else "unknown")]
    if training:
        rows += [("updates", f"{training.get('updates')} ({training.get('tokens', 0):,} tokens, "
                             f"{training.get('tokens_per_s', 0):,.0f} tokens/s on {training.get('threads', '?')} "
                             f"{training.get('device', 'cpu')} thread(s), {training.get('seconds', 0):.0f} s)"),
                 ("final loss", f"{training.get('final_loss', float('nan')):.3f}")]
    if isinstance(check.get("greedy_rouge_l"), (int, float)):
        rows.append(("check", f"greedy Rouge-L {check['greedy_rouge_l']:.1f}, best of greedy + "
                              f"{check.get('num_samples', '?')} samples {check.get('oracle_rouge_l', float('nan')):.1f} "
                              f"({check.get('num_examples', '?')} examples)"))
    body = [f"# {name}", "",
            "A small decoder-only model trained from scratch by `cappy generator train` (Cappy on Ray) to produce "
            "candidate answers for a Cappy scorer to choose among. It is a toy: useful for its diverse samples on "
            "the tasks it was trained on, not as a chat model.", "",
            "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tok = AutoTokenizer.from_pretrained("{name}")',
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            'ids = tok("<s>Q: Change tense to PAST: I walk home.\\nA:\\n", return_tensors="pt", add_special_tokens=False)',
            "print(tok.decode(model.generate(**ids, max_new_tokens=32)[0], skip_special_tokens=True))", "```", "",
            "vLLM loads the folder as it is (`vllm.LLM(model=FOLDER)`).", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)
