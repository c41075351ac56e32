"""The task-example record and its Parquet schema (the output of ``cappy data prepare``).

One row per BIG-Bench example and split. Schema (documented in docs/data.md):

| column          | type          | meaning                                                        |
|-----------------|---------------|----------------------------------------------------------------|
| task            | string        | BIG-Bench task name (directory name), e.g. ``gem``              |
| subtask         | string        | subtask name (``gem:xsum``) or ``""`` for tasks without subtasks |
| split           | string        | ``train`` or ``validation`` (validation is the test set)        |
| example_idx     | int64         | index within (task, subtask, split), as the HF loader's ``idx`` |
| instruction     | string        | the formatted input, exactly the HF loader's ``inputs``         |
| references      | list<string>  | reference answers (HF ``targets``)                              |
| choices         | list<string>  | answer choices of multiple-choice examples, else empty          |
| choice_scores   | list<double>  | score of each choice (1.0 = correct), aligned with ``choices``  |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

EXAMPLE_SCHEMA = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("subtask", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("example_idx", pa.int64(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("references", pa.list_(pa.string()), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("choice_scores", pa.list_(pa.float64()), nullable=False),
    ]
)

SPLITS = ("train", "validation")


@dataclass
class Example:
    """One BIG-Bench example, formatted as the Hugging Face BIG-bench loader formats it."""

    task: str
    subtask: str
    split: str
    example_idx: int
    instruction: str
    references: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    choice_scores: list[float] = field(default_factory=list)

    @property
    def is_multiple_choice(self) -> bool:
        return len(self.choices) > 0


def examples_to_table(examples: Sequence[Example]) -> pa.Table:
    columns = {f.name: [getattr(e, f.name) for e in examples] for f in dataclasses.fields(Example)}
    return pa.Table.from_pydict(columns, schema=EXAMPLE_SCHEMA)


def table_to_examples(table: pa.Table) -> list[Example]:
    missing = [n for n in EXAMPLE_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"table is missing example column(s) {missing}; expected {EXAMPLE_SCHEMA.names}")
    return [Example(**{n: row[n] for n in EXAMPLE_SCHEMA.names}) for row in table.to_pylist()]


def write_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(examples_to_table(examples), tmp)
    tmp.replace(path)
    return path


def read_examples(paths: str | Path | Iterable[str | Path]) -> list[Example]:
    """Read one Parquet file, a directory written by ``cappy data prepare``, or several files."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    else:
        files = [Path(p) for p in paths]
    out: list[Example] = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no such Parquet file: {f}")
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{f}: not a readable Parquet file: {e}") from e
        try:
            out.extend(table_to_examples(table))
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e
    return out


def split_path(out_dir: str | Path, task: str, split: str) -> Path:
    """Where ``cappy data prepare`` writes one task's split: ``OUT/<task>/<split>.parquet``."""
    return Path(out_dir) / task / f"{split}.parquet"
