"""Evaluation: Cappy's pick against the baselines, and classification with Cappy alone.

Generation (per task, on validation candidates). Every method picks one candidate per
instruction; the metric is that candidate's Rouge-L F1 against the best-matching reference
(``cappy_core.labeling.rouge.rouge_l``), averaged over the task's instructions; the summary is the
unweighted mean over tasks, ×100.

* ``cappy``: highest scorer score (the paper's scorer), ties to the first candidate in decoding order.
* ``cappy+lm+mbr`` (beyond the paper): highest ``fused`` value — the within-instruction
  standardized Cappy score, generator likelihood and MBR, weighted per task on held-out train
  instructions (:mod:`cappy_core.selection.selectors`); reported only when every candidate has one.
* ``beam4`` and one baseline per sampling config: the first sample (``sample_idx == 0``) of that
  decoding — the LLM used alone with that decoding.
* ``self_score_sum`` / ``self_score_mean``: the candidate the generator itself rates most likely
  (summed / per-token mean log-likelihood), ties to the first.
* ``mbr``: the training-free Rouge-L consensus pick (highest ``mbr`` value: mean Rouge-L against
  the other candidates); a baseline, reported only when every candidate has one.
* ``oracle`` (best of all candidates) and ``random`` (expected value of a uniform pick) bound
  what selection can do; they are reported, not baselines.

Every argmax is :func:`cappy_core.scorer.model.select_best`, the rule serve uses too: ties go to the
first candidate, NaN never wins over a number, and an instruction whose values are all NaN is an
error. :func:`method_order` is the order methods are reported in (the sweep's table).

Only ``oracle`` (and the ``random`` expectation) read the labels (``rouge``): :func:`picks` is
every other method's choice without them, so masking validation labels until this final step
changes no pick. :func:`per_instruction_values` keeps each pick's Rouge-L per instruction (for
the paired bootstrap of :mod:`cappy_core.selection.bootstrap`); :func:`ranker_spearman` is how well each
ranking signal orders one instruction's candidates by Rouge-L.

Classification: score each answer choice with Cappy (:func:`score_choices`), argmax (ties to the
first), accuracy against the choices with the highest ``choice_score``
(:func:`classification_accuracy`); :func:`chance_accuracy` is a uniform random pick's expected
accuracy. ``cappy eval-mc`` (``jobs/eval_mc.py``) runs this on held-out BIG-Bench tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from cappy_core.generation import PAPER_DECODING_NAMES
from cappy_core.scorer.metrics import spearman
from cappy_core.scorer.model import select_best

SELF_SUM, SELF_MEAN, CAPPY, ORACLE, RANDOM = "self_score_sum", "self_score_mean", "cappy", "oracle", "random"
#: The training-free Rouge-L consensus baseline, and the fused selector (Cappy beyond the paper).
MBR, FUSED = "mbr", "cappy+lm+mbr"
#: Bounds of what selection can do: reported, never a baseline.
BOUNDS = (ORACLE, RANDOM)
#: The same two picks by a scorer that never saw the task (``cappy sweep --zero-shot``,
#: :mod:`cappy_core.selection.zero_shot`): what the endpoint does for a task without its own scorer.
CAPPY_0SHOT, FUSED_0SHOT = "cappy-0shot", "fused-0shot"
#: Cappy's selectors: compared against the baselines, never one of them.
SELECTORS = (CAPPY, FUSED, CAPPY_0SHOT, FUSED_0SHOT)


@dataclass(frozen=True)
class ScoredCandidate:
    """What evaluation needs of one candidate (decoding order = list order)."""

    decoding: str
    sample_idx: int
    rouge: float  # Rouge-L F1 against the instruction's references (the label)
    logprob_sum: float
    logprob_mean: float
    score: float | None = None  # Cappy's raw score, if scored
    mbr: float | None = None  # mean Rouge-L against the other candidates (cappy_core.selection.selectors.mbr_scores)
    fused: float | None = None  # the fused selector's value (cappy_core.selection.selectors.fused_scores)


#: The per-candidate value each ranking method picks the highest of (the rankers of :func:`ranker_spearman`).
RANKER_FIELDS = {CAPPY: "score", FUSED: "fused", SELF_SUM: "logprob_sum", SELF_MEAN: "logprob_mean", MBR: "mbr"}


def baseline_methods(decodings: Sequence[str]) -> list[str]:
    """The LLM-alone baselines present in ``decodings`` (in decoding order), then self-scores, then MBR."""
    seen: list[str] = []
    for d in decodings:
        if d not in seen:
            seen.append(d)
    return seen + [SELF_SUM, SELF_MEAN, MBR]


def method_order(decodings: Sequence[str] = PAPER_DECODING_NAMES) -> list[str]:
    """Every method in the order results are reported: Cappy, the fused selector, the baselines
    of ``decodings`` (:func:`baseline_methods`), then the bounds oracle and random."""
    return [CAPPY, FUSED] + baseline_methods(decodings) + [ORACLE, RANDOM]


def pick(method: str, candidates: Sequence[ScoredCandidate]) -> int | None:
    """Index of the candidate ``method`` picks, or None if it cannot pick (e.g. no such decoding).
    Only ``oracle`` reads the labels (``rouge``)."""
    if not candidates:
        raise ValueError("an instruction has no candidates")
    field = RANKER_FIELDS.get(method)
    if field is not None:
        values = [getattr(c, field) for c in candidates]
        if any(v is None for v in values):
            raise ValueError(f"{method} pick needs a {field} value on every candidate")
        return select_best(values)
    if method == ORACLE:
        return select_best([c.rouge for c in candidates])
    for i, c in enumerate(candidates):  # a decoding's first sample
        if c.decoding == method and c.sample_idx == 0:
            return i
    return None


def picks(groups: Sequence[Sequence[ScoredCandidate]], methods: Sequence[str]) -> dict[str, list[int]]:
    """``{method: [index of its pick, per instruction]}`` for the ``methods`` that can pick in
    every instruction (others are left out; ``random`` has no pick). Reads no label except for
    ``oracle``."""
    out: dict[str, list[int]] = {}
    for m in methods:
        if m == RANDOM:
            continue
        chosen = [pick(m, g) for g in groups]
        if all(p is not None for p in chosen):
            out[m] = chosen
    return out


def task_methods(groups: Sequence[Sequence[ScoredCandidate]]) -> list[str]:
    """The methods :func:`evaluate_task` reports for ``groups``, in :func:`method_order`: Cappy,
    the fused selector and MBR only when every candidate has their value."""
    have = {m: all(getattr(c, f) is not None for g in groups for c in g) for m, f in RANKER_FIELDS.items()}
    return [m for m in method_order([c.decoding for g in groups for c in g]) if have.get(m, True)]


def per_instruction_values(groups: Sequence[Sequence[ScoredCandidate]],
                           methods: Sequence[str] | None = None) -> dict[str, list[float]]:
    """``{method: [Rouge-L ×100 of its pick, per instruction]}``, aligned across methods
    (instruction order = ``groups``); ``random`` gets each instruction's mean Rouge-L ×100.
    ``methods`` defaults to :func:`task_methods`; one that cannot pick everywhere is left out.
    The mean of a method's list is its :func:`evaluate_task` number."""
    if not groups:
        raise ValueError("no instructions to evaluate")
    methods = task_methods(groups) if methods is None else methods
    out = {m: [100.0 * g[p].rouge for g, p in zip(groups, chosen)] for m, chosen in picks(groups, methods).items()}
    if RANDOM in methods:
        out[RANDOM] = [100.0 * sum(c.rouge for c in g) / len(g) for g in groups]
    return {m: out[m] for m in methods if m in out}


def evaluate_instructions(groups: Sequence[Sequence[ScoredCandidate]], methods: Sequence[str]) -> dict[str, float]:
    """Mean Rouge-L ×100 per method over instructions (plus ``random``); a method that cannot pick
    for some instruction is left out rather than counted as 0."""
    if not groups:
        raise ValueError("no instructions to evaluate")
    out = {m: 100.0 * sum(g[p].rouge for g, p in zip(groups, chosen)) / len(groups)
           for m, chosen in picks(groups, methods).items()}
    out[RANDOM] = 100.0 * sum(sum(c.rouge for c in g) / len(g) for g in groups) / len(groups)
    return out


def evaluate_task(groups: Sequence[Sequence[ScoredCandidate]]) -> dict[str, float]:
    """All methods for one task (:func:`task_methods`), in :func:`method_order`: Cappy and the
    fused selector (if every candidate has their value), the baselines, oracle and random."""
    return evaluate_instructions(groups, [m for m in task_methods(groups) if m != RANDOM])


def ranker_spearman(groups: Sequence[Sequence[ScoredCandidate]]) -> dict[str, dict[str, Any]]:
    """How well each ranking signal orders an instruction's candidates by Rouge-L:
    ``{ranker: {"mean": mean over instructions of Spearman(signal, rouge), "instructions": n}}``
    for the rankers of :data:`RANKER_FIELDS` whose value every candidate has, in
    :func:`method_order`. A NaN signal ranks lowest (as in a pick); an instruction where either
    side is constant (or has one candidate) has no correlation and is not counted (``mean`` is
    None when no instruction counts)."""
    out: dict[str, dict[str, Any]] = {}
    for m in task_methods(groups):
        field = RANKER_FIELDS.get(m)
        if field is None:
            continue
        rhos = []
        for g in groups:
            signal = [-math.inf if math.isnan(float(getattr(c, field))) else float(getattr(c, field)) for c in g]
            rho = spearman(signal, [c.rouge for c in g])
            if not math.isnan(rho):
                rhos.append(rho)
        out[m] = {"mean": sum(rhos) / len(rhos) if rhos else None, "instructions": len(rhos)}
    return out


def is_unlabeled(label: float | None) -> bool:
    """A candidate whose instruction has no references: a null label, or NaN (no Rouge-L is NaN)."""
    return label is None or math.isnan(label)


def scored_groups(table: Any) -> tuple[list[list[ScoredCandidate]], list[str], int]:
    """A scored candidate table (``cappy_core.labeling.candidates`` columns plus ``score``, and ``mbr`` /
    ``fused`` where present) as ``(groups, instruction_ids, unlabeled)``: one group of candidates
    per instruction, in file order (= decoding order); instructions without references (null
    labels, or NaN: no Rouge-L is NaN, so it grades nothing) are left out and counted in ``unlabeled``."""
    optional = [c for c in ("mbr", "fused") if c in table.column_names]
    cols = table.select(["instruction_id", "decoding", "sample_idx", "label", "logprob_sum", "logprob_mean",
                         "score"] + optional).to_pydict()
    groups: dict[str, list[ScoredCandidate]] = {}
    unlabeled: set[str] = set()
    for i, iid in enumerate(cols["instruction_id"]):
        if is_unlabeled(cols["label"][i]):
            unlabeled.add(iid)
            continue
        groups.setdefault(iid, []).append(ScoredCandidate(
            decoding=cols["decoding"][i], sample_idx=cols["sample_idx"][i], rouge=cols["label"][i],
            logprob_sum=cols["logprob_sum"][i], logprob_mean=cols["logprob_mean"][i], score=cols["score"][i],
            **{c: cols[c][i] for c in optional}))
    return list(groups.values()), list(groups), len(unlabeled - set(groups))


def mean_over_tasks(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over tasks, for the methods every task has."""
    if not per_task:
        raise ValueError("no tasks to summarise")
    common = set.intersection(*(set(v) for v in per_task.values()))
    first = next(iter(per_task.values()))
    return {m: sum(v[m] for v in per_task.values()) / len(per_task) for m in first if m in common}


def best_baseline(summary: Mapping[str, float]) -> tuple[str, float]:
    """The strongest baseline: LLM alone, self-score or MBR (never cappy, the fused selector,
    oracle or random)."""
    cands = {m: v for m, v in summary.items() if m not in SELECTORS + BOUNDS}
    if not cands:
        raise ValueError("no baseline in the summary")
    m = max(cands, key=lambda k: cands[k])
    return m, cands[m]


# --- classification (Cappy alone) -----------------------------------------------------------

def classification_accuracy(choice_scores: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> float:
    """Accuracy of argmax(Cappy score) over choices; correct = a choice with the top
    ``choice_score`` (several choices can be correct)."""
    if len(choice_scores) != len(scores):
        raise ValueError(f"{len(choice_scores)} examples but {len(scores)} score lists")
    if not scores:
        raise ValueError("no examples to evaluate")
    correct = 0
    for i, (gold, pred) in enumerate(zip(choice_scores, scores)):
        if len(gold) != len(pred) or not gold:
            raise ValueError(f"example {i}: {len(gold)} choices but {len(pred)} scores")
        top = max(gold)
        correct += gold[select_best(pred)] == top
    return correct / len(scores)


def chance_accuracy(choice_scores: Sequence[Sequence[float]]) -> float:
    """Expected accuracy of a uniform random pick: mean over examples of the fraction of choices
    that are correct (have the top ``choice_score``)."""
    if not choice_scores:
        raise ValueError("no examples to evaluate")
    total = 0.0
    for i, gold in enumerate(choice_scores):
        if not gold:
            raise ValueError(f"example {i}: no choices")
        top = max(gold)
        total += sum(1 for g in gold if g == top) / len(gold)
    return total / len(choice_scores)


def score_choices(scorer: Any, examples: Sequence[Any], *, chunk_pairs: int = 1024,
                  progress: Callable[[int], None] | None = None, **score_kwargs: Any) -> list[list[float]]:
    """Score every ``(instruction, choice)`` pair of multiple-choice examples; one score list per
    example, aligned with its ``choices``.

    ``scorer`` is anything with ``score(instructions, responses, **score_kwargs) -> list[float]``
    (a :class:`cappy_core.scorer.model.Scorer`); ``examples`` anything with ``instruction`` and
    ``choices`` (a :class:`cappy_core.data.records.Example`). The pairs of all examples are scored
    together, ``chunk_pairs`` per call (the scorer batches each call by length); ``progress(n)``
    is called after each call with the number of pairs it scored.
    """
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
    instructions: list[str] = []
    responses: list[str] = []
    sizes: list[int] = []
    for i, ex in enumerate(examples):
        choices = list(ex.choices)
        if not choices:
            where = f" of task {ex.task!r}" if getattr(ex, "task", None) else ""
            raise ValueError(f"example {i}{where} has no answer choices (not multiple-choice)")
        instructions += [ex.instruction] * len(choices)
        responses += choices
        sizes.append(len(choices))
    flat: list[float] = []
    for start in range(0, len(responses), chunk_pairs):
        part = scorer.score(instructions[start:start + chunk_pairs], responses[start:start + chunk_pairs],
                            **score_kwargs)
        part = [float(x) for x in part]
        if len(part) != len(responses[start:start + chunk_pairs]):
            raise ValueError(f"scorer returned {len(part)} scores for "
                             f"{len(responses[start:start + chunk_pairs])} pairs")
        flat += part
        if progress is not None:
            progress(len(part))
    out: list[list[float]] = []
    pos = 0
    for n in sizes:
        out.append(flat[pos:pos + n])
        pos += n
    return out
