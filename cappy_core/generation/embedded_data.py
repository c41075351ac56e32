"""Training data for the embedded generator: BIG-Bench examples → token sequences → batches.

One training sequence per example (a reference chosen at random when there are several)::

    <s> {instruction}\\n  |  {reference} </s>
    ------- prompt ------  ---- response ----

The prompt is :func:`cappy_core.generation.embedded_model.prompt_text` tokenised exactly as generation tokenises it
(left-truncated to ``max_prompt_tokens`` with BOS kept, so the end of the instruction, with its
question and ``A:``, survives); the response is the reference plus EOS, cut to
``max_response_tokens`` (a cut response has no EOS: the model must not learn to stop there).

Loss on the response only (``loss_on="response"``: prompt positions are ``-100`` in ``labels``)
or on every token (``"all"``). Batches group sequences of similar length (sorted within a
shuffled window of ``bucket_batches`` batches, then the batches are shuffled), so padding stays
small without packing unrelated examples into one row.

The task mixture caps each task at ``max_per_task`` examples, so the 58k-example
``unnatural_in_context_learning`` does not drown the 16-example tasks, while small tasks are not
repeated hundreds of times either.

Tested in ``tests/core/test_lm.py``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from cappy_core.data.records import Example
from cappy_core.generation.embedded_model import prompt_text

LOSS_ON = ("response", "all")
# Prompts are cut to this many characters per allowed token before tokenising (a BPE token is
# never this long on average), so a 6,000-character instruction is not tokenised in full only to
# keep its last 192 tokens.
_CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class LMSequence:
    """One tokenised training example."""

    task: str
    prompt: tuple[int, ...]  # BOS + prompt tokens
    response: tuple[int, ...]  # reference tokens (+ EOS unless cut)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def mix_tasks(examples_by_task: Mapping[str, Sequence[Example]], *, max_per_task: int | None,
              seed: int = 0) -> list[Example]:
    """Examples with references, at most ``max_per_task`` per task (a seeded random subset)."""
    rng = random.Random(seed)
    out: list[Example] = []
    for task in sorted(examples_by_task):
        usable = [e for e in examples_by_task[task] if e.references]
        if max_per_task is not None and len(usable) > max_per_task:
            usable = rng.sample(usable, max_per_task)
        out.extend(usable)
    return out


def tokenizer_texts(examples_by_task: Mapping[str, Sequence[Example]], *, max_chars_per_task: int,
                    seed: int = 0) -> list[str]:
    """A sample of every task's instructions and references (≤ ``max_chars_per_task`` characters
    per task, whole texts) to train the BPE tokenizer on: every task's vocabulary is represented
    and training takes seconds."""
    rng = random.Random(seed)
    texts: list[str] = []
    for task in sorted(examples_by_task):
        examples = list(examples_by_task[task])
        rng.shuffle(examples)
        used = 0
        for e in examples:
            for t in [prompt_text(e.instruction), *e.references[:2]]:
                if used >= max_chars_per_task:
                    break
                texts.append(t)
                used += len(t)
            if used >= max_chars_per_task:
                break
    return texts


def encode_examples(examples: Sequence[Example], tokenizer, *, max_prompt_tokens: int,
                    max_response_tokens: int, seed: int = 0) -> list[LMSequence]:
    """Tokenise examples into :class:`LMSequence` (one random reference each; examples without
    references are skipped)."""
    if max_prompt_tokens < 2 or max_response_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 2 and max_response_tokens >= 1, got "
                         f"{max_prompt_tokens} and {max_response_tokens}")
    rng = random.Random(seed)
    examples = [e for e in examples if e.references]
    prompts = [prompt_text(e.instruction)[-max_prompt_tokens * _CHARS_PER_TOKEN_BOUND:] for e in examples]
    refs = [rng.choice(e.references)[:(max_response_tokens + 1) * _CHARS_PER_TOKEN_BOUND] for e in examples]
    p_ids = tokenizer(prompts, truncation=True, max_length=max_prompt_tokens)["input_ids"]
    r_ids = tokenizer(refs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for e, p, r in zip(examples, p_ids, r_ids):
        r = r[:max_response_tokens] if len(r) >= max_response_tokens else r + [eos]
        out.append(LMSequence(task=e.task, prompt=tuple(p), response=tuple(r)))
    return out


def collate(seqs: Sequence[LMSequence], *, pad_id: int, loss_on: str = "response") -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding, and on the
    prompt when ``loss_on="response"``) for :func:`cappy_core.scorer.training.causal_lm_loss`."""
    import torch

    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        row = s.prompt + s.response
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        first = len(s.prompt) if loss_on == "response" else 1  # position 0 (BOS) is never a target
        labels[i, first:len(row)] = ids[i, first:len(row)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LengthBucketedBatches:
    """Endless, seeded stream of collated micro-batches over ``seqs``, epoch after epoch.

    Each epoch shuffles the sequences, sorts each window of ``batch_size * bucket_batches`` of
    them by length, cuts the window into batches and shuffles the batches. Iteration stops when
    ``max_batches`` batches have been given or when ``time.monotonic()`` passes ``deadline``
    (the training loop then returns gracefully). ``tokens`` and ``loss_tokens`` count the
    non-padding and the trained-on tokens given out so far.
    """

    def __init__(self, seqs: Sequence[LMSequence], *, batch_size: int, pad_id: int,
                 loss_on: str = "response", bucket_batches: int = 32, seed: int = 0,
                 deadline: float | None = None, max_batches: int | None = None):
        if not seqs:
            raise ValueError("no training sequences")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seqs = list(seqs)
        self.batch_size, self.pad_id, self.loss_on = batch_size, pad_id, loss_on
        self.bucket_batches, self.seed = max(1, bucket_batches), seed
        self.deadline, self.max_batches = deadline, max_batches
        self.epoch = 0
        self.batches = self.tokens = self.loss_tokens = self.padded_tokens = 0
        self._it = self._generate()

    def _epoch_batches(self, epoch: int) -> list[list[LMSequence]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(self.seqs)
        rng.shuffle(order)
        window = self.batch_size * self.bucket_batches
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=len)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def mean_padded_tokens_per_batch(self) -> float:
        """Padded tokens (rows × longest row) of an average batch of an epoch: the compute an
        update costs, for sizing a schedule to a time budget."""
        batches = self._epoch_batches(self.epoch)
        return sum(len(b) * max(map(len, b)) for b in batches) / len(batches)

    def _generate(self) -> Iterator[dict]:
        while True:
            for group in self._epoch_batches(self.epoch):
                yield collate(group, pad_id=self.pad_id, loss_on=self.loss_on)
            self.epoch += 1

    def __iter__(self) -> "LengthBucketedBatches":
        return self

    def __next__(self) -> dict:
        if self.max_batches is not None and self.batches >= self.max_batches:
            raise StopIteration
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise StopIteration
        batch = next(self._it)
        self.batches += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["attention_mask"].numel()
        self.loss_tokens += int((batch["labels"][:, 1:] != -100).sum())
        return batch
