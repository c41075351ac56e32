"""Sampled, labelled candidates and their Parquet layout (the output of ``cappy sample``).

One row per (instruction, decoding, sample). Files: ``OUT/<task>/<split>/part-NNNNN.parquet``,
one per input shard (rows ``NNNNN·shard_size …`` of ``DATA/<task>/<split>.parquet``), each
followed by its completion record ``part-NNNNN.done.json``; ``OUT/sample_config.json`` holds the
settings that define the output. Rows within a file are in input order, then decoding order.

| column         | type    | meaning                                                                 |
|----------------|---------|-------------------------------------------------------------------------|
| instruction_id | string  | ``<subtask or task>/<split>/<example_idx>``, unique per instruction      |
| task           | string  | BIG-Bench task                                                           |
| subtask        | string  | ``task:subtask`` or ``""``                                               |
| split          | string  | ``train`` or ``validation``                                              |
| example_idx    | int64   | the example's index (as in the example Parquet)                          |
| instruction    | string  | the example's instruction (the generator saw its last max_prompt_tokens) |
| decoding       | string  | decoding name: ``beam4``, ``sample``, ``temp0.9``, ``topk40``, ``topp0.95`` … |
| sample_idx     | int32   | 0..n-1 within the decoding                                               |
| text           | string  | the candidate response                                                   |
| num_tokens     | int32   | generated tokens, counting a final end-of-sequence token                 |
| logprob_sum    | float64 | the generator's log-likelihood of those tokens (temperature 1, untruncated) |
| logprob_mean   | float64 | ``logprob_sum / num_tokens``                                             |
| label          | float64 | Rouge-L F1 against the example's references; null when it has none       |

Tested in ``tests/jobs/test_sample_label.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from cappy_core.generation import Candidate

__all__ = [
    "CANDIDATE_SCHEMA",
    "instruction_id",
    "shard_path",
    "done_path",
    "candidate_files",
    "read_candidates",
    "expand_with_candidates",
    "add_labels",
]

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("instruction_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("subtask", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("example_idx", pa.int64(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("decoding", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("logprob_sum", pa.float64(), nullable=False),
        pa.field("logprob_mean", pa.float64(), nullable=False),
        pa.field("label", pa.float64(), nullable=True),
    ]
)


def instruction_id(task: str, subtask: str, split: str, example_idx: int) -> str:
    """``<subtask or task>/<split>/<example_idx>`` (subtasks are named ``task:subtask``)."""
    return f"{subtask or task}/{split}/{example_idx}"


def shard_path(out_dir: str | Path, task: str, split: str, shard: int) -> Path:
    return Path(out_dir) / task / split / f"part-{shard:05d}.parquet"


def done_path(out_dir: str | Path, task: str, split: str, shard: int) -> Path:
    """The completion record of a shard: present only once its Parquet file is complete."""
    return Path(out_dir) / task / split / f"part-{shard:05d}.done.json"


def candidate_files(out_dir: str | Path, tasks: Iterable[str] | None = None,
                    splits: Iterable[str] | None = None) -> list[Path]:
    """The completed shard files under ``out_dir`` (those with a completion record)."""
    out = Path(out_dir)
    files = []
    for f in sorted(out.glob("*/*/part-*.parquet")):
        split, task = f.parent.name, f.parent.parent.name
        if (tasks is None or task in tasks) and (splits is None or split in splits):
            if (f.parent / (f.stem + ".done.json")).is_file():
                files.append(f)
    return files


def read_candidates(out_dir: str | Path, tasks: Iterable[str] | None = None,
                    splits: Iterable[str] | None = None) -> pa.Table:
    """All completed candidate rows under ``out_dir`` (optionally some tasks / splits)."""
    files = candidate_files(out_dir, None if tasks is None else set(tasks), None if splits is None else set(splits))
    if not files:
        return CANDIDATE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=CANDIDATE_SCHEMA) for f in files])


def expand_with_candidates(batch: pa.Table, cands: Sequence[Sequence["Candidate"]], started: float) -> pa.Table:
    """One row per candidate: each input row repeated for its candidates, with the candidate
    columns, ``_k`` (the candidate's index within its instruction, for ordering) and ``_t0``
    (``started``: when generation of this batch began)."""
    flat = [c for per in cands for c in per]
    out = batch.take([i for i, per in enumerate(cands) for _ in per])
    cols = {
        "decoding": pa.array([c.decoding for c in flat], pa.string()),
        "sample_idx": pa.array([c.sample_idx for c in flat], pa.int32()),
        "text": pa.array([c.text for c in flat], pa.string()),
        "num_tokens": pa.array([c.num_tokens for c in flat], pa.int32()),
        "logprob_sum": pa.array([c.logprob_sum for c in flat], pa.float64()),
        "logprob_mean": pa.array([c.logprob_mean for c in flat], pa.float64()),
        "_k": pa.array([k for per in cands for k in range(len(per))], pa.int32()),
        "_t0": pa.array([started] * len(flat), pa.float64()),
    }
    for name, col in cols.items():
        out = out.append_column(name, col)
    return out


def add_labels(batch: pa.Table) -> pa.Table:
    """Replace ``references`` by ``label``: Rouge-L F1 of each candidate's ``text`` against its
    example's references (null without references)."""
    from cappy_core.labeling.rouge import rouge_l

    labels = []
    for text, refs in zip(batch["text"].to_pylist(), batch["references"].to_pylist()):
        refs = [r for r in (refs or []) if r is not None]
        labels.append(rouge_l(text, refs) if refs else None)
    return batch.drop_columns(["references"]).append_column("label", pa.array(labels, pa.float64()))
