"""The scorer's training batches: :class:`PairWindowCollator` turns a window of shuffled
(instruction, response, label) rows into this rank's tokenised micro-batches, grouping rows of
similar length (dynamic padding) or keeping each instruction's rows in one micro-batch
(:func:`pack_instructions`); :func:`iter_micro_batches` chains windows, epochs and the resume
skip. Every rank of a run, and a rerun, sees the same batches. Tested in
``tests/core/test_training.py``."""

from __future__ import annotations

import threading
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

Batch = Mapping[str, torch.Tensor]


def _window_rng(seed: int, instructions: Sequence[str], responses: Sequence[str]) -> np.random.Generator:
    """Seeded by ``seed`` and the window's first row: the same on every rank and every run."""
    first = (str(instructions[0]) + "\x00" + str(responses[0])).encode("utf-8", "replace")
    return np.random.default_rng([seed, zlib.crc32(first)])


def pack_instructions(instructions: Sequence[str], responses: Sequence[str], micro_batch_size: int,
                      world_size: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """The instruction-grouped plan of a window (:class:`PairWindowCollator` with
    ``group_by_instruction``): global micro-batches, each one row-index array per rank.

    The window's instructions (groups of rows) are packed largest first (ties in seeded random
    order), each into the fullest micro-batch that still has room for it within
    ``micro_batch_size`` rows; a group larger than that is a micro-batch of its own. The
    micro-batches are shuffled (same seeding) and dealt out ``world_size`` at a time; the last
    ``count mod world_size`` are left out. So every row is used at most once (all of them on one
    rank) and an instruction's rows are never split."""
    if len(instructions) == 0:
        return []
    rows_of: dict[str, list[int]] = {}
    for i, x in enumerate(instructions):
        rows_of.setdefault(str(x), []).append(i)
    groups = list(rows_of.values())
    rng = _window_rng(seed, instructions, responses)
    order = sorted(rng.permutation(len(groups)), key=lambda j: -len(groups[j]))  # stable: ties stay random
    batches: list[list[int]] = []
    open_by_room: list[list[int]] = [[] for _ in range(micro_batch_size + 1)]  # open batches by free rows
    for j in order:
        rows = groups[j]
        room = next((r for r in range(len(rows), micro_batch_size) if open_by_room[r]), None)
        if room is None:
            batches.append([])
            b, room = len(batches) - 1, micro_batch_size
        else:
            b = open_by_room[room].pop()
        batches[b].extend(rows)
        if room > len(rows):
            open_by_room[room - len(rows)].append(b)
    shuffled = [np.asarray(batches[i]) for i in rng.permutation(len(batches))]
    return [shuffled[i * world_size:(i + 1) * world_size] for i in range(len(shuffled) // world_size)]


class PairWindowCollator:
    """One window of pair rows → this rank's tokenised micro-batches.

    A window holds consecutive rows of the (already shuffled) pair stream; ``G =
    micro_batch_size · world_size`` rows make one *global* micro-batch. Every rank receives the
    same window and makes the same decisions from its content alone, so the ranks agree without
    talking. :meth:`plan` cuts the window into global micro-batches, one row-index array per rank:

    * default: keep the first ``⌊rows/G⌋·G`` rows (a short window drops its tail); with
      ``sort_by_length``, order them by character length (instruction + response, longest first,
      stable) and cut into global micro-batches of ``G`` rows, so each batch pads to a similar
      length, then shuffle the order of those batches with a generator seeded from ``seed`` and
      the window's first row, so long and short batches alternate at random but identically on
      every rank and every run; without it, consecutive rows in order. Rank ``r`` takes rows
      ``r·B .. (r+1)·B`` of each global batch;
    * ``group_by_instruction``: :func:`pack_instructions`, so every row is used and an
      instruction's rows stay in one micro-batch of at most ``micro_batch_size`` rows (unless
      it alone is larger); ``sort_by_length`` is ignored.

    Each micro-batch is ``tokenizer(instructions, responses, truncation="longest_first",
    max_length=..., padding="longest")`` with a float32 ``labels`` tensor and a ``group`` tensor
    (int64 id of each row's instruction within the micro-batch, for the listwise losses).
    Callable from several threads: the tokenizer runs under a lock. Input: a mapping with numpy
    arrays ``instruction``, ``response``, ``label``.
    """

    def __init__(self, tokenizer: Any, *, max_length: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, sort_by_length: bool = True, seed: int = 0,
                 group_by_instruction: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.sort_by_length = sort_by_length
        self.seed = int(seed)
        self.group_by_instruction = group_by_instruction
        self._lock = threading.Lock()

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def plan(self, instructions: Sequence[str], responses: Sequence[str]) -> list[list[np.ndarray]]:
        """Row indices of each global micro-batch of this window: one array per rank."""
        if self.group_by_instruction:
            return pack_instructions(instructions, responses, self.micro_batch_size, self.world_size, self.seed)
        g, b = self.global_batch, self.micro_batch_size
        k = len(instructions) // g
        if k == 0:
            return []
        keep = np.arange(k * g)
        if not self.sort_by_length or k == 1:
            chunks = [keep[i * g:(i + 1) * g] for i in range(k)]
        else:
            lengths = np.array([len(instructions[i]) + len(responses[i]) for i in keep])
            order = keep[np.argsort(-lengths, kind="stable")]
            chunks = [order[i * g:(i + 1) * g] for i in range(k)]
            chunks = [chunks[i] for i in _window_rng(self.seed, instructions, responses).permutation(k)]
        return [[c[r * b:(r + 1) * b] for r in range(self.world_size)] for c in chunks]

    def tokenize(self, instructions: Sequence[str], responses: Sequence[str],
                 labels: Sequence[float]) -> dict[str, torch.Tensor]:
        instructions = [str(x) for x in instructions]
        with self._lock:
            enc = self.tokenizer(instructions, [str(x) for x in responses], truncation="longest_first",
                                 max_length=self.max_length, padding="longest", return_tensors="pt")
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        out["group"] = torch.as_tensor(np.unique(np.asarray(instructions), return_inverse=True)[1].astype(np.int64))
        return out

    def micro_batches(self, batch: Mapping[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the window ``batch``, tokenised one at a time."""
        instructions, responses = batch["instruction"], batch["response"]
        labels = np.asarray(batch["label"], dtype=np.float32)
        for ranks in self.plan(instructions, responses):
            mine = ranks[self.rank]
            yield self.tokenize([instructions[i] for i in mine], [responses[i] for i in mine], labels[mine])

    def __call__(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        return list(self.micro_batches(batch))


def micro_batches_per_epoch(rows: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Global micro-batches one pass over ``rows`` pair rows gives (the tail is dropped)."""
    return rows // (micro_batch_size * world_size)


def table_windows(columns: Mapping[str, Sequence[Any]], window_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive windows of ``window_rows`` rows of column arrays: the plain-process
    counterpart of Ray Data's ``iter_batches(batch_size=window_rows)``."""
    arrays = {k: np.asarray(v, dtype=object if k != "label" else np.float64) for k, v in columns.items()}
    n = len(next(iter(arrays.values()))) if arrays else 0
    for start in range(0, n, window_rows):
        yield {k: v[start:start + window_rows] for k, v in arrays.items()}


def iter_micro_batches(windows: Callable[[], Iterable[Iterable[Batch]]], *, epochs: int = 1,
                       skip: int = 0) -> Iterator[Batch]:
    """Flatten collated windows into micro-batches over ``epochs`` passes, skipping the first
    ``skip`` micro-batches (those consumed before a restart: ``updates_done · grad_accum``).
    ``windows()`` starts one pass over the data and must give the same windows every time."""
    seen = 0
    for _ in range(epochs):
        for window in windows():
            for mb in window:
                if seen >= skip:
                    yield mb
                seen += 1


def first_window(windows: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """All rows of a pass as one window (the instruction-grouped plan spans the whole epoch)."""
    parts = list(windows)
    if not parts:
        return []
    return [{k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}]
