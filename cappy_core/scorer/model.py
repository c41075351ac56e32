"""The Cappy scorer: loading, scoring and saving, in one class, :class:`Scorer`.

A scorer is a sequence classifier with one output (``num_labels=1``) that reads the pair
``(instruction, response)`` and returns its raw first logit: higher means "more likely correct".
There is no sigmoid; training regresses the logit on a Rouge-L label with MSE.

One loader, one format. :meth:`Scorer.from_pretrained` is the only way finetune, eval and serve
get a scorer, and :meth:`Scorer.save_pretrained` writes the only checkpoint format: a Hugging
Face folder with ``model.safetensors``, the tokenizer files and a small ``cappy.json`` that says
what the checkpoint is (format version, base model, ``max_length``, and whatever the caller adds:
step, metrics, config). Pickled weights are refused unless asked for. The names the loader
accepts (``"minilm"``, a local folder, a hub id), the weights policy and the format's constants
live in :mod:`cappy_core.scorer.checkpoint`; the argmax rule in :mod:`cappy_core.scorer.pick`.
Both are imported here too, so ``from cappy_core.scorer.model import ...`` reaches every scorer name.

Scoring (:meth:`Scorer.score`) tokenises every pair once, sorts pairs by token length, forms
batches of similar length (``batch_size`` pairs, optionally capped by a ``max_tokens`` budget of
padded tokens per batch), pads each batch only to its own longest pair, and returns the scores in
input order as ``list[float]``.

Tested in ``tests/core/test_scorer.py``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cappy_core.io import atomic_dir
from cappy_core.scorer.checkpoint import (CAPPY_JSON, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, EMBEDDED_ALIAS,
                                          EMBEDDED_SOURCE, PICKLE_SUFFIXES, RESULTS_JSON, PickleCheckpointError,
                                          embedded_model_path, model_card, resolve_source, weights_kind)
from cappy_core.scorer.embedded import split_revision
from cappy_core.scorer.pick import select_best, select_best_grouped

__all__ = [
    "Scorer", "DTYPES", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_TOKENS", "flops_per_pair", "length_buckets",
    "quiet_transformers",
    # re-exported from cappy_core.scorer.checkpoint / cappy_core.scorer.pick
    "CAPPY_JSON", "CHECKPOINT_FORMAT", "CHECKPOINT_FORMAT_VERSION", "EMBEDDED_ALIAS", "EMBEDDED_SOURCE",
    "RESULTS_JSON", "PickleCheckpointError", "embedded_model_path", "model_card", "resolve_source",
    "weights_kind", "select_best", "select_best_grouped",
]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_warned_fresh_head: set[str] = set()
#: Default batching of :meth:`Scorer.score`, tuned on CPU (MiniLM-L6, 1–2 threads, BIG-Bench pairs
#: of ~65 tokens): a budget of ~1024 padded tokens per batch keeps every linear layer at the
#: machine's matmul peak (their rows = batch tokens; 256–4096 rows all run at peak) while keeping
#: padding small; bigger budgets (2048: −6 %, 4096: −15 %) pad more and fall out of cache, fixed
#: batches of 32 pad more (−20 %). On a GPU pass much larger values (e.g. 256 and 32768).
DEFAULT_BATCH_SIZE = 128
DEFAULT_MAX_TOKENS = 1024


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars (for commands that print a table)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        """Load a scorer: ``"minilm"``, a local Hugging Face folder, or a hub id (``REPO@REVISION`` pins a commit).

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
        source, revision = (source, None) if is_local else split_revision(source)
        pin = {"revision": revision} if revision else {}  # REPO@REVISION: a pinned hub commit
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, use_safetensors=use_safetensors, dtype=torch.float32,
                output_loading_info=True, **pin)
            tokenizer = AutoTokenizer.from_pretrained(source, **pin)
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

    def fingerprint(self) -> str:
        """What this scorer's scores depend on, as a sha256: every tensor of its weights (name,
        dtype, shape and bytes), its architecture and tokenizer (class and vocabulary size),
        ``max_length`` and ``dtype``. Equal for the same weights however they were obtained (a
        fresh finetune or its stage-cache copy), so scores can be cached by it
        (:func:`cappy_core.selection.scored_tables.cached_scores`); ~0.1 s for MiniLM's 90 MB.
        Hashed anew on every call: a tensor's version counter cannot tell whether it changed
        (the fused AdamW step updates the weights without moving it)."""
        import hashlib

        h = hashlib.sha256(json.dumps([type(self.model).__name__, type(self.tokenizer).__name__,
                                       len(self.tokenizer), self.max_length, self.dtype]).encode())
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().data)
        return "weights:" + h.hexdigest()

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

        Identical pairs are scored once and share that score: an instruction's candidates often
        repeat a text (beams and samples agree; 34–47% of the sampled pairs were distinct on the
        stand-in tasks), so scoring a candidate table costs its distinct pairs only.
        """
        instructions = _check_texts("instructions", instructions)
        responses = _check_texts("responses", responses)
        if len(instructions) != len(responses):
            raise ValueError(
                f"score: {len(instructions)} instructions but {len(responses)} responses; "
                "pass one instruction per response (repeat it for several candidates)")
        if not instructions:
            return []
        distinct: dict[tuple[str, str], int] = {}
        inverse = [distinct.setdefault(pair, len(distinct)) for pair in zip(instructions, responses)]
        if len(distinct) < len(inverse):
            scores = self._score([i for i, _ in distinct], [r for _, r in distinct], batch_size, max_tokens)
            return [scores[k] for k in inverse]
        return self._score(instructions, responses, batch_size, max_tokens)

    def _score(self, instructions: list[str], responses: list[str], batch_size: int,
               max_tokens: int | None) -> list[float]:
        """:meth:`score` of distinct pairs."""
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
            pickles = [p.name for p in tmp.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
            if pickles or weights_kind(tmp) != "safetensors":
                raise RuntimeError(f"save_pretrained wrote no safetensors or a pickle: {sorted(pickles)}")
        self.metadata = info
        return path
