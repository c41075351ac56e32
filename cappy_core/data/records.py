"""The task-example record and its Parquet schema (the output of ``cappy data prepare``).

One row per BIG-Bench example and split. Schema (also in README, "Data formats"):

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

Tested in ``tests/core/test_bigbench_data.py``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from cappy_core.io import write_parquet

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
    """Write atomically (:func:`cappy_core.io.write_parquet`): a crash never leaves a half-written Parquet."""
    return write_parquet(examples_to_table(examples), path)


def read_examples(paths: str | Path | Iterable[str | Path]) -> list[Example]:
    """Read one Parquet file, a directory written by ``cappy data prepare`` (its ``*.parquet``
    files, hidden ones such as a crashed write's temporary skipped), or several files."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(f for f in p.rglob("*.parquet") if not f.name.startswith(".")) if p.is_dir() else [p]
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


def read_text_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """The ``instruction`` and ``response`` columns of a Parquet or JSONL file (pairs to score)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such pairs file: {path}")
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    for i, row in enumerate(rows):
        if "instruction" not in row or "response" not in row:
            raise ValueError(f"{path}: row {i} lacks an 'instruction' or 'response' column")
    return [r["instruction"] for r in rows], [r["response"] for r in rows]


def split_path(out_dir: str | Path, task: str, split: str) -> Path:
    """Where ``cappy data prepare`` writes one task's split: ``OUT/<task>/<split>.parquet``."""
    return Path(out_dir) / task / f"{split}.parquet"
