"""Pair files: labelled pairs as Parquet (:data:`cappy_core.labeling.rouge.PAIR_SCHEMA`), written,
checked and read (:func:`write_pairs`, :func:`read_pairs`, :func:`check_pair_file`,
:func:`read_pair_columns`); a training run keeps its ``train.parquet`` / ``eval.parquet`` in one
folder (:func:`write_pair_files`, :func:`existing_pair_files`). Also the label-checked Parquet
reading that the sample files of :mod:`cappy_core.labeling.pair_mixture` share (:func:`parquet_files`,
:func:`check_labels`, :class:`LabelError`).

Separate from :mod:`cappy_core.labeling.pair_mixture` because the training jobs read and check pair files
without building a mixture. Tested in ``tests/core/test_pretrain_data.py``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cappy_core.labeling.rouge import PAIR_SCHEMA, LabeledPair, pairs_to_table, table_to_pairs


class LabelError(ValueError):
    """A label is NaN or outside [0, 1]; the message names the file and the row."""


def check_labels(labels: Sequence[float] | np.ndarray, where: str, skip: np.ndarray | None = None) -> None:
    """Raise :class:`LabelError` naming ``where`` and the first bad row (0-based); rows where
    ``skip`` is True are not checked."""
    arr = np.asarray(labels, dtype=np.float64)
    ok = (arr >= 0.0) & (arr <= 1.0)  # NaN fails both comparisons
    if skip is not None:
        ok |= skip
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        more = f" ({bad.size} bad rows in all)" if bad.size > 1 else ""
        raise LabelError(f"{where}: row {i} (0-based): label {float(arr[i])!r} is not in [0, 1]{more}")


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files at ``path``: a file is itself, a folder every ``*.parquet`` below it."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{p}: no Parquet files in this folder")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"no such file or folder: {p}")
    return [p]


def parquet_schema(f: Path) -> pa.Schema:
    """``f``'s schema; an unreadable file is a ``ValueError`` naming it."""
    try:
        return pq.read_schema(f)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{f}: not a readable Parquet file: {e}") from e


def read_parquet_columns(f: Path, columns: Sequence[str]) -> pa.Table:
    """``columns`` of ``f``; a missing one is a ``ValueError`` naming the file and its columns."""
    names = parquet_schema(f).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{f}: missing column(s) {missing}; has {names}")
    return pq.read_table(f, columns=list(columns))


def labels_array(column: pa.ChunkedArray) -> np.ndarray:
    """A label column as float64, nulls as NaN (for :func:`check_labels`)."""
    return np.asarray([np.nan if v is None else v for v in column.to_pylist()], dtype=np.float64) \
        if column.null_count else column.to_numpy().astype(np.float64)


def write_pairs(pairs: Sequence[LabeledPair], path: str | Path, *, row_group_size: int = 4096) -> Path:
    """Write pairs as Parquet (:data:`PAIR_SCHEMA`) atomically."""
    from cappy_core.io import write_parquet

    return write_parquet(pairs_to_table(pairs), path, row_group_size=row_group_size)


def write_pair_files(train: Sequence[LabeledPair], held: Sequence[LabeledPair], pairs_dir: str | Path,
                     log: Callable[[str], None] = print) -> tuple[str, str | None]:
    """``PAIRS_DIR/train.parquet`` and (when ``held``) ``eval.parquet``; logs what they hold.
    Returns their paths (eval ``None`` without held-out pairs)."""
    d = Path(pairs_dir)
    train_file = write_pairs(train, d / "train.parquet")
    eval_file = write_pairs(held, d / "eval.parquet") if held else None
    sources = Counter(p.source for p in train)
    log(f"pairs: {len(train)} train ({', '.join(f'{k} {v}' for k, v in sorted(sources.items()))}; "
        f"{len({p.instruction for p in train})} instructions, {len({p.task for p in train})} tasks), "
        f"{len(held)} held out ({len({p.instruction for p in held})} instructions) -> {d}")
    return str(train_file), str(eval_file) if eval_file else None


def existing_pair_files(pairs_dir: str | Path) -> tuple[str, str | None] | None:
    """What :func:`write_pair_files` left in ``pairs_dir`` (``None`` without a train file)."""
    d = Path(pairs_dir)
    if not (d / "train.parquet").is_file():
        return None
    return str(d / "train.parquet"), str(d / "eval.parquet") if (d / "eval.parquet").is_file() else None


def check_pair_file(path: str | Path) -> int:
    """Check pair file(s) (a file or a folder of Parquet) without loading the text: the pair
    columns exist and every label is in [0, 1]. Returns the number of rows; an error names the
    file and the row."""
    total = 0
    for f in parquet_files(path):
        names = parquet_schema(f).names
        missing = [c for c in PAIR_SCHEMA.names if c not in names]
        if missing:
            raise ValueError(f"{f}: missing pair column(s) {missing}; expected {PAIR_SCHEMA.names}")
        arr = labels_array(pq.read_table(f, columns=["label"]).column("label"))
        check_labels(arr, str(f))
        total += len(arr)
    return total


def read_pair_columns(path: str | Path, columns: Sequence[str] = ("instruction", "response", "label")) -> dict[str, list]:
    """Columns of pair file(s) as plain lists (no label check: see :func:`check_pair_file`)."""
    out: dict[str, list] = {c: [] for c in columns}
    for f in parquet_files(path):
        part = read_parquet_columns(f, columns).to_pydict()
        for c in columns:
            out[c].extend(part[c])
    return out


def read_pairs(path: str | Path) -> list[LabeledPair]:
    """Read pair file(s) written by :func:`write_pairs` (or any Parquet with the pair columns),
    checking labels first."""
    check_pair_file(path)
    out: list[LabeledPair] = []
    for f in parquet_files(path):
        out.extend(table_to_pairs(pq.read_table(f)))
    return out
