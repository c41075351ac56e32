"""Weak labels for Cappy: an exact, fast Rouge-L and the (instruction, response, label) pairs.

Rouge-L
-------
:func:`rouge_l` returns bit for bit what the paper's labeller returns::

    RougeScorer(["rougeL"], use_stemmer=True).score_multi(references, prediction)["rougeL"].fmeasure

It replicates rouge-score 0.1.2 step by step: ``text.lower()``; every run of characters outside
``[a-z0-9]`` becomes a separator; tokens longer than 3 characters go through nltk's
``PorterStemmer()`` (default ``NLTK_EXTENSIONS`` mode, the one rouge-score builds); tokens that
are not ``^[a-z0-9]+$`` after stemming are dropped. For each reference, precision = lcs /
len(prediction tokens), recall = lcs / len(reference tokens), F = ``2 * p * r / (p + r)`` (the
same float operations in the same order as ``rouge_score.scoring.fmeasure``); an empty token list
on either side scores 0. ``score_multi`` keeps the reference with the highest F (``np.argmax``,
first maximum wins), so its F is the maximum over references.

Where it differs from rouge-score, on purpose:

* an empty ``references`` list raises ``ValueError`` (rouge-score crashes inside ``np.argmax``
  with "attempt to get argmax of an empty sequence");
* a plain ``str`` passed as ``references`` raises ``TypeError`` (rouge-score would silently score
  against each *character* of it);
* the result is always a ``float``: rouge-score returns the int ``0`` when either side has no
  tokens (``0 == 0.0``, so values still compare equal).

Speed: each distinct stem gets an integer id, written as one character (``chr``, skipping the
surrogate range), so a text becomes a short ``str`` and rapidfuzz's compiled ``LCSseq`` computes
the LCS length. Stems, tokens and encoded texts are cached (texts in a bounded LRU: the same
references are scored against many candidates). A :class:`RougeL` instance holds the caches; it
is not thread-safe (use one per thread; Ray Data workers are processes).

Training pairs
--------------
:func:`build_training_pairs` turns examples (+ sampled candidates) into labelled pairs with the
reference Cappy rules; :data:`PAIR_SCHEMA` is their Parquet schema:

| column      | type    | meaning                                                              |
|-------------|---------|----------------------------------------------------------------------|
| task        | string  | task of the example the pair comes from                              |
| instruction | string  | the scorer's first segment (the example's formatted input)           |
| response    | string  | the scorer's second segment                                          |
| label       | float64 | 1.0 reference or correct choice, 0.0 negative or wrong choice, else Rouge-L F1 |
| source      | string  | ``reference``, ``negative``, ``candidate`` or ``choice``             |
"""

from __future__ import annotations

import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
from rapidfuzz.distance import LCSseq

__all__ = [
    "RougeL",
    "MAX_CACHED_TOKENS",
    "rouge_l",
    "rouge_l_batch",
    "LabeledPair",
    "PAIR_SCHEMA",
    "build_training_pairs",
    "pairs_to_table",
    "table_to_pairs",
]

# rouge_score.tokenize: NON_ALPHANUM_RE.sub(" ", text.lower()) then SPACES_RE.split(...) keeps
# exactly the maximal [a-z0-9] runs (plus empty strings, which the final filter drops).
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$").match  # rouge_score.tokenize.VALID_TOKEN_RE
_SURROGATES = 0xE000 - 0xD800
_NUM_CODES = 0x110000 - _SURROGATES  # characters available as token ids
MAX_CACHED_TOKENS = _NUM_CODES // 2  # the other half: room for the new tokens of one call
_lcs_length = LCSseq.similarity


class RougeL:
    """Exact rouge-score Rouge-L F1 (``use_stemmer=True``, ``score_multi``), with caches.

    ``max_cached_texts`` bounds the LRU of encoded texts; ``max_cached_tokens`` bounds the
    token table (at most :data:`MAX_CACHED_TOKENS`): when a call starts with the table full, all
    caches are cleared and ids start again (ids only need to agree within one call, so a reset
    never happens in the middle of one).
    """

    def __init__(self, max_cached_texts: int = 100_000, max_cached_tokens: int = 500_000):
        if max_cached_texts < 0 or not 1 <= max_cached_tokens <= MAX_CACHED_TOKENS:
            raise ValueError(
                f"need max_cached_texts >= 0 and 1 <= max_cached_tokens <= {MAX_CACHED_TOKENS}"
            )
        # Imported here: nltk's package import pulls in scipy (~1 s), and only Rouge-L needs it.
        from nltk.stem.porter import PorterStemmer

        self._stem = PorterStemmer().stem  # the same class and mode rouge-score instantiates
        self._max_texts = max_cached_texts
        self._max_tokens = max_cached_tokens
        self._token_code: dict[str, str] = {}  # raw token -> code of its stem ("" = dropped)
        self._stem_code: dict[str, str] = {}  # stem -> one character
        self._texts: OrderedDict[str, str] = OrderedDict()  # text -> encoded tokens

    # -- encoding -------------------------------------------------------------------------

    def _code_of(self, token: str) -> str:
        stem = self._stem(token) if len(token) > 3 else token
        if not _VALID_TOKEN(stem):
            code = ""
        else:
            code = self._stem_code.get(stem)
            if code is None:
                n = len(self._stem_code)
                if n >= _NUM_CODES:
                    limit = _NUM_CODES - MAX_CACHED_TOKENS
                    raise ValueError(f"more than {limit} new distinct tokens in one call")
                code = chr(n if n < 0xD800 else n + _SURROGATES)
                self._stem_code[stem] = code
        self._token_code[token] = code
        return code

    def _encode(self, text: str) -> str:
        """The text's rouge-score tokens, one character per distinct stem."""
        texts = self._texts
        hit = texts.get(text)
        if hit is not None:
            texts.move_to_end(text)
            return hit
        token_code = self._token_code
        codes = []
        for token in _TOKEN_RE.findall(text.lower()):
            code = token_code.get(token)
            codes.append(self._code_of(token) if code is None else code)
        encoded = "".join(codes)
        if self._max_texts:
            texts[text] = encoded
            if len(texts) > self._max_texts:
                texts.popitem(last=False)
        return encoded

    def _encode_all(self, prediction: str, references: Sequence[str]) -> tuple[str, list[str]]:
        if isinstance(references, str):
            raise TypeError("references must be a sequence of strings, not a single str")
        if len(references) == 0:
            raise ValueError(
                "references is empty: Rouge-L needs at least one reference "
                "(rouge-score's score_multi crashes on an empty list)"
            )
        if len(self._token_code) >= self._max_tokens:  # full: start again, between calls only
            self._token_code.clear()
            self._stem_code.clear()
            self._texts.clear()
        return self._encode(prediction), [self._encode(r) for r in references]

    # -- scoring --------------------------------------------------------------------------

    def score(self, prediction: str, references: Sequence[str]) -> float:
        """Rouge-L F1 of ``prediction`` against its best-matching reference."""
        pred, refs = self._encode_all(prediction, references)
        if not pred:
            return 0.0
        n_pred = len(pred)
        best = 0.0
        for ref in refs:
            lcs = _lcs_length(pred, ref)
            if lcs:
                p = lcs / n_pred
                r = lcs / len(ref)
                f = 2 * p * r / (p + r)
                if f > best:
                    best = f
        return best

    def score_batch(
        self, predictions: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[float]:
        """``[score(p, refs) for p, refs in zip(predictions, references)]``, lengths checked."""
        if len(predictions) != len(references):
            raise ValueError(
                f"predictions has {len(predictions)} items but references has {len(references)}"
            )
        score = self.score
        return [score(p, refs) for p, refs in zip(predictions, references)]


_default: RougeL | None = None


def _default_scorer() -> RougeL:
    global _default
    if _default is None:
        _default = RougeL()
    return _default


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Exactly rouge-score's ``score_multi(references, prediction)["rougeL"].fmeasure``."""
    return _default_scorer().score(prediction, references)


def rouge_l_batch(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """:func:`rouge_l` for each (prediction, references) pair."""
    return _default_scorer().score_batch(predictions, references)


# -- training pairs ---------------------------------------------------------------------------

# Parquet schema of the labelled pairs (column meanings: the table in the module docstring).
PAIR_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("label", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class LabeledPair:
    instruction: str
    response: str
    label: float
    source: str  # "reference" | "negative" | "candidate" | "choice"
    task: str


def _check_nested(name: str, value: Sequence, i: int) -> None:
    if isinstance(value, str):
        raise ValueError(f"{name}[{i}] is a str; expected a list of strings")


def _validate_pair_inputs(
    tasks, instructions, references, candidates, candidate_labels, train_size
) -> None:
    n = len(instructions)
    lengths = [("tasks", tasks), ("references", references)]
    lengths += [("candidates", candidates), ("candidate_labels", candidate_labels)]
    for name, seq in lengths:
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} items but instructions has {n}")
    if candidate_labels is not None and candidates is None:
        raise ValueError("candidate_labels given without candidates")
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise ValueError(f"train_size must be a positive int or None, got {train_size!r}")
    for i in range(n):
        _check_nested("references", references[i], i)
        if candidates is None:
            continue
        _check_nested("candidates", candidates[i], i)
        if candidate_labels is None:
            if len(candidates[i]) and not len(references[i]):
                raise ValueError(
                    f"example {i} has candidates but no references: Rouge-L labels need a "
                    "reference (pass candidate_labels)"
                )
            continue
        labels = candidate_labels[i]
        _check_nested("candidate_labels", labels, i)
        if len(labels) != len(candidates[i]):
            raise ValueError(
                f"candidate_labels[{i}] has {len(labels)} labels "
                f"for {len(candidates[i])} candidates"
            )
        bad = [x for x in labels if not math.isfinite(x)]
        if bad:
            raise ValueError(f"candidate_labels[{i}] has non-finite label(s) {bad}")


def build_training_pairs(
    tasks: Sequence[str],
    instructions: Sequence[str],
    references: Sequence[Sequence[str]],
    candidates: Sequence[Sequence[str]] | None = None,
    candidate_labels: Sequence[Sequence[float]] | None = None,
    *,
    train_size: int | None = None,
    seed: int = 0,
    negatives: bool = True,
) -> list[LabeledPair]:
    """Labelled (instruction, response) pairs with the reference Cappy rules.

    Example ``i`` is ``(tasks[i], instructions[i], references[i], candidates[i])``. In three
    passes over all examples, each pair keyed by ``(instruction, response)`` and added only if
    that key is not already present (so the earliest rule wins):

    1. every reference → label 1.0 (``source="reference"``);
    2. if ``negatives``: for each reference added in pass 1, one reference of another example
       (different index, same task, chosen uniformly among the task's examples that have
       references, then uniformly among its references) → 0.0 (``"negative"``). If that pair is
       already present (e.g. the other example shares the answer) it is skipped, not redrawn.
       A task with fewer than two examples that have references gives no negatives;
    3. every candidate → ``candidate_labels[i][k]`` if given, else :func:`rouge_l` against
       ``references[i]`` (``"candidate"``). A candidate equal to a reference or to a negative
       keeps the earlier label.

    The pairs are then shuffled with ``random.Random(seed)`` (the same generator that drew the
    negatives) and, if ``train_size`` is set, cut to it or tiled: the whole shuffled list is
    repeated and the repetition cut to ``train_size``. Same inputs and seed → same output.
    """
    _validate_pair_inputs(tasks, instructions, references, candidates, candidate_labels, train_size)
    n = len(instructions)
    rng = random.Random(seed)
    pairs: list[LabeledPair] = []
    seen: set[tuple[str, str]] = set()

    def add(i: int, response: str, label: float, source: str) -> bool:
        key = (instructions[i], response)
        if key in seen:
            return False
        seen.add(key)
        pairs.append(LabeledPair(instructions[i], response, float(label), source, tasks[i]))
        return True

    positives: list[tuple[int, str]] = []
    for i in range(n):
        for ref in references[i]:
            if add(i, ref, 1.0, "reference"):
                positives.append((i, ref))

    if negatives:
        pool: dict[str, list[int]] = {}  # task -> indices of its examples with references
        position: dict[int, int] = {}  # example index -> its position in its task's pool
        for i in range(n):
            if len(references[i]):
                members = pool.setdefault(tasks[i], [])
                position[i] = len(members)
                members.append(i)
        for i, _ in positives:
            members = pool[tasks[i]]
            if len(members) < 2:
                continue
            k = rng.randrange(len(members) - 1)  # uniform over the other examples
            j = members[k if k < position[i] else k + 1]
            add(i, rng.choice(references[j]), 0.0, "negative")

    if candidates is not None:
        scorer = _default_scorer() if candidate_labels is None else None
        for i in range(n):
            for k, cand in enumerate(candidates[i]):
                key = (instructions[i], cand)
                if key in seen:
                    continue
                if candidate_labels is not None:
                    label = candidate_labels[i][k]
                else:
                    label = scorer.score(cand, references[i])
                add(i, cand, label, "candidate")

    rng.shuffle(pairs)
    if train_size is not None:
        if not pairs:
            raise ValueError(
                f"no pairs to tile to train_size={train_size}: no references or candidates"
            )
        reps = -(-train_size // len(pairs))
        pairs = (pairs * reps)[:train_size]
    return pairs


def pairs_to_table(pairs: Sequence[LabeledPair]) -> pa.Table:
    """Pairs as a table with :data:`PAIR_SCHEMA` (column order as in the schema)."""
    columns = {name: [getattr(p, name) for p in pairs] for name in PAIR_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=PAIR_SCHEMA)


def table_to_pairs(table: pa.Table) -> list[LabeledPair]:
    """The inverse of :func:`pairs_to_table`; extra columns are ignored."""
    missing = [name for name in PAIR_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"table is missing pair column(s) {missing}; expected {PAIR_SCHEMA.names}")
    table = table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
    return [
        LabeledPair(row["instruction"], row["response"], row["label"], row["source"], row["task"])
        for row in table.to_pylist()
    ]
