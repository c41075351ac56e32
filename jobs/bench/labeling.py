"""Benchmark: our exact Rouge-L (cappy_core.labeling.rouge) against rouge-score, on real BIG-Bench pairs.

    python -m jobs.bench.labeling --pairs 20000 --per-set 17 --seed 0

Builds (prediction, references) pairs from real BIG-Bench references and perturbations of them
(:func:`make_rouge_pairs`, also used by the exactness test), scores them with
``RougeScorer(["rougeL"], use_stemmer=True).score_multi`` and with ``RougeL.score_batch`` (a fresh
instance: caches cold; then again warm), checks every value is equal and prints one JSON line.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cappy_core.config import ConfigError, build_parser, resolve_and_run, run_main

# Generative tasks whose references are mostly short to medium (words) and varied: English
# sentences, word lists, German with umlauts and gender stars, labels, multi-reference sets.
DEFAULT_TASKS = (
    "tense",
    "rephrase",
    "simple_text_editing",
    "word_sorting",
    "gender_inclusive_sentences_german",
    "international_phonetic_alphabet_transliterate",
    "few_shot_nlg",
    "scientific_press_release",
    "auto_categorization",
    "qa_wikidata",
    "polish_sequence_labeling",
)

# Snippets that stress the tokenizer: lower() turning non-ASCII into ASCII (Kelvin sign, dotted
# capital I), ligatures, full-width and superscript digits, scripts other than Latin, combining
# marks, zero-width and non-breaking spaces, emoji.
_UNICODE = (
    "é", "ß", "ẞ", "İ", "\u212a", "\u212b", "ﬁ", "①", "２０２３", "½", "²", "日本語",
    "मोनोफाईलेटिक", "ʃə", "ˈbətən", "Σίσυφος", "ǅ", "\u0307", "😀", "\u200b", "\xa0", "\u2028",
    "Ünïcödé", "naïve café", "Einwohner*innen", "ﬀ", "Ⅻ", "\ufeff",
)
_PUNCT = (
    ".", ",", "!", "?", ";", ":", "-", "--", "'", '"', "(", ")", "...", "/", "*", "_", "#", "&",
)
_SUFFIXES = ("s", "es", "ed", "ing", "ly", "ness", "ational", "ization", "ful", "er", "est", "ies")
_NUMBERS = ("0", "7", "42", "3.14", "1,000", "-5", "2023", "10th", "1e9", "007", "x2", "4ever")


@dataclass
class LabelingBenchConfig:
    pairs: int = field(default=20_000, metadata={"help": "number of (prediction, references) pairs"})
    seed: int = field(default=0, metadata={"help": "pair sampling seed"})
    per_set: int = field(default=17, metadata={
        "help": "predictions per reference set (paper: 17 candidates per instruction)"})
    tasks_dir: Optional[str] = field(default=None, metadata={
        "help": "an extra folder of BIG-Bench tasks (<dir>/<task>/task.json) besides the vendored and cached ones"})
    max_words: int = field(default=40, metadata={"help": "longest reference kept, in words"})


def load_reference_pool(catalog, tasks: Sequence[str] = DEFAULT_TASKS, max_words: int = 40) -> list[list[str]]:
    """Each example's references (both splits, from a :class:`~cappy_core.data.catalog.TaskCatalog`),
    those of ≤ max_words words."""
    catalog.resolve(tasks)
    pool: list[list[str]] = []
    for task in tasks:
        for split in catalog.load(task).values():
            for ex in split:
                refs = [r for r in ex.references if len(r.split()) <= max_words]
                if refs:
                    pool.append(refs)
    if not pool:
        raise ValueError(f"no references found for tasks {list(tasks)}")
    return pool


def _perturb(text: str, rng: random.Random, pool: Sequence[Sequence[str]]) -> str:
    words = text.split()
    kind = rng.randrange(14)
    if kind == 0 and words:  # drop words
        for _ in range(rng.randint(1, max(1, len(words) // 3))):
            if words:
                words.pop(rng.randrange(len(words)))
    elif kind == 1 and len(words) > 1:  # swap two words
        a, b = rng.randrange(len(words)), rng.randrange(len(words))
        words[a], words[b] = words[b], words[a]
    elif kind == 2:  # shuffle all words
        rng.shuffle(words)
    elif kind == 3 and words:  # duplicate words or the whole text
        if rng.random() < 0.2:
            words = words * 2
        else:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(words))
                words.insert(i, words[i])
    elif kind == 4:  # case
        how = rng.randrange(5)
        text = (text.upper(), text.lower(), text.title(), text.swapcase(),
                "".join(c.upper() if rng.random() < 0.5 else c for c in text))[how]
        return text
    elif kind == 5:  # punctuation: add, or strip
        if rng.random() < 0.3:
            return "".join(c for c in text if c.isalnum() or c.isspace())
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(words) + 1)
            p = rng.choice(_PUNCT)
            if rng.random() < 0.5 and words and i < len(words):
                words[i] = words[i] + p  # glued to a word
            else:
                words.insert(i, p)
    elif kind == 6:  # truncate: words or raw characters (may cut a word)
        if rng.random() < 0.5 and words:
            k = rng.randrange(len(words) + 1)
            words = words[:k] if rng.random() < 0.7 else words[k:]
        else:
            return text[: rng.randrange(len(text) + 1)]
    elif kind == 7:  # words of another example's reference
        other = rng.choice(rng.choice(pool)).split()
        for w in rng.sample(other, min(len(other), rng.randint(1, 4))):
            words.insert(rng.randrange(len(words) + 1), w)
    elif kind == 8:  # unicode
        for _ in range(rng.randint(1, 3)):
            u = rng.choice(_UNICODE)
            if rng.random() < 0.5 and words:
                i = rng.randrange(len(words))
                w = words[i]
                j = rng.randrange(len(w) + 1)
                words[i] = w[:j] + u + w[j:]
            else:
                words.insert(rng.randrange(len(words) + 1), u)
    elif kind == 9:  # numbers
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_NUMBERS))
    elif kind == 10 and words:  # inflect (exercises the stemmer)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(words))
            words[i] = words[i] + rng.choice(_SUFFIXES)
    elif kind == 11:  # whitespace: tabs, newlines, runs, or words glued together
        seps = (" ", "  ", "\t", "\n", " \n ", "", "-")
        if not words:
            return rng.choice(seps)
        out = words[0]
        for w in words[1:]:
            out += (rng.choice(seps) if rng.random() < 0.3 else " ") + w
        return out
    elif kind == 12 and text:  # character typo
        i = rng.randrange(len(text))
        op = rng.randrange(3)
        c = rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ")
        if op == 0:  # replace
            return text[:i] + c + text[i + 1 :]
        if op == 1:  # delete
            return text[:i] + text[i + 1 :]
        return text[:i] + c + text[i:]  # insert
    elif kind == 13:  # nearly empty
        return rng.choice(("", " ", "\n", "...", "!!", "-", "a", "I", "the", "é", "😀", "0"))
    return " ".join(words)


def make_rouge_pairs(
    references_pool: Sequence[Sequence[str]], n: int, seed: int, per_set: int = 1
) -> list[tuple[str, list[str]]]:
    """``n`` (prediction, references) pairs from real references and perturbations of them.

    References: one example's references, sometimes with references of other examples, an empty
    or perturbed reference, or a duplicate added (1 to ~6 references). Each reference set gets
    ``per_set`` predictions (as an instruction gets several sampled candidates; the last set may
    get fewer). Prediction: a reference of the set, another example's reference or two
    references joined, then 0–3 perturbations (word drops, swaps, shuffles, duplications, case,
    punctuation, truncation, foreign words, unicode, numbers, inflections, whitespace, typos,
    near-empty strings). Deterministic for a seed.
    """
    if per_set < 1:
        raise ValueError(f"per_set must be >= 1, got {per_set}")
    rng = random.Random(seed)
    pool = references_pool
    pairs: list[tuple[str, list[str]]] = []
    while len(pairs) < n:
        refs = list(rng.choice(pool))
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 3)):
                refs.append(rng.choice(rng.choice(pool)))
        extra = rng.random()
        if extra < 0.04:
            refs.append(rng.choice(("", " ", "...", "😀")))
        elif extra < 0.10:
            refs.append(_perturb(rng.choice(refs), rng, pool))
        elif extra < 0.13:
            refs.append(rng.choice(refs))
        if rng.random() < 0.3:
            rng.shuffle(refs)
        for _ in range(min(per_set, n - len(pairs))):
            base = rng.random()
            if base < 0.7:
                pred = rng.choice(refs)
            elif base < 0.9:
                pred = rng.choice(rng.choice(pool))
            else:
                sep = rng.choice((" ", ". ", "\n", ""))
                pred = rng.choice(refs) + sep + rng.choice(rng.choice(pool))
            for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
                pred = _perturb(pred, rng, pool)
            pairs.append((pred, refs))
    return pairs


def run(cfg: LabelingBenchConfig) -> int:
    """Score the pairs both ways, print one JSON line; 1 when any value differs."""
    if cfg.pairs < 1 or cfg.per_set < 1:
        raise ConfigError("--pairs and --per-set must be positive")

    from rouge_score import rouge_scorer

    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.labeling.rouge import RougeL

    catalog = TaskCatalog.open(task_dirs=[cfg.tasks_dir] if cfg.tasks_dir else ())
    pool = load_reference_pool(catalog, max_words=cfg.max_words)
    pairs = make_rouge_pairs(pool, cfg.pairs, cfg.seed, per_set=cfg.per_set)
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    t0 = time.perf_counter()
    expected = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in pairs]
    t_ref = time.perf_counter() - t0

    ours = RougeL()  # fresh: every cache empty
    t0 = time.perf_counter()
    cold = ours.score_batch(predictions, references)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = ours.score_batch(predictions, references)
    t_warm = time.perf_counter() - t0

    all_equal = cold == expected and warm == expected
    result = {
        "bench": "labeling",
        "pairs": len(pairs),
        "per_set": cfg.per_set,
        "rouge_score_pairs_per_s": round(len(pairs) / t_ref, 1),
        "ours_pairs_per_s": round(len(pairs) / t_cold, 1),
        "speedup": round(t_ref / t_cold, 2),
        "ours_warm_pairs_per_s": round(len(pairs) / t_warm, 1),
        "speedup_warm": round(t_ref / t_warm, 2),
        "all_equal": all_equal,
    }
    print(json.dumps(result))
    return 0 if all_equal else 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(LabelingBenchConfig, prog=prog or "python -m jobs.bench.labeling",
                          description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run_main(lambda: resolve_and_run(LabelingBenchConfig, args, None, run))  # --print-config: the YAML, no run


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
