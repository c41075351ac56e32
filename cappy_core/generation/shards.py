"""The sampler's unit of work and resume: shards of instructions, their files and records.

``cappy sample`` cuts each ``DATA/<task>/<split>.parquet`` (written by ``cappy data prepare``)
into shards of ``shard_size`` rows. A shard is done when its candidates file
``OUT/<task>/<split>/part-NNNNN.parquet`` and then its completion record
``part-NNNNN.done.json`` are written (layout and schema: :mod:`cappy_core.labeling.candidates`); a rerun
plans only the shards without a record and redoes each of them whole, so an interrupted run
resumes with no missing or duplicate rows.

* :func:`prepared_tasks`, :func:`read_split`: what ``--data`` holds;
* :func:`plan_shards`: the shards to run (with the rows they cannot use, counted by reason) and
  the records of those already done;
* :func:`check_settings`: ``OUT/sample_config.json``, refusing to mix outputs of other settings;
* :func:`write_shard`: a shard's candidates and its record, each written atomically;
* :func:`summarize` / :func:`summary_lines`: what a run did, over everything on disk.

Tested in ``tests/jobs/test_sample_label.py`` and ``tests/jobs/test_sample_faults.py``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from cappy_core.labeling.candidates import CANDIDATE_SCHEMA, done_path, instruction_id, shard_path
from cappy_core.config import SettingError
from cappy_core.io import write_json, write_parquet

#: Columns of the example Parquet the sampler reads.
REQUIRED_COLUMNS = ("task", "subtask", "split", "example_idx", "instruction", "references")
#: The rows a shard feeds to generation: the example columns, its id, its position in the shard
#: (``_pos``, to restore input order) and the shard's key.
SHARD_ROW_SCHEMA = pa.schema([("task", pa.string()), ("subtask", pa.string()), ("split", pa.string()),
                              ("example_idx", pa.int64()), ("instruction", pa.string()),
                              ("references", pa.list_(pa.string())), ("instruction_id", pa.string()),
                              ("_pos", pa.int64()), ("shard", pa.string())])


@dataclass
class Shard:
    task: str
    split: str
    index: int
    rows: pa.Table  # the usable instructions (SHARD_ROW_SCHEMA)
    n_input: int
    skipped: dict[str, list[str]]  # reason -> row descriptions

    @property
    def key(self) -> str:
        return f"{self.task}/{self.split}/{self.index:05d}"


def prepared_tasks(data: str | Path) -> list[str]:
    """The task folders under ``data`` that hold Parquet files."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder; write it with `cappy data prepare --out {data}`")
    return sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.parquet")))


def read_split(path: Path) -> pa.Table:
    """The :data:`REQUIRED_COLUMNS` of one example Parquet file, or a clear error."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected the example schema that "
                         f"`cappy data prepare` writes ({', '.join(REQUIRED_COLUMNS)}, ...)")
    return table.select(list(REQUIRED_COLUMNS))


def plan_shards(data: str | Path, out: str | Path, tasks: Sequence[str], splits: Sequence[str], *,
                shard_size: int, max_examples_per_task: int | None = None,
                overwrite: bool = False) -> tuple[list[Shard], list[tuple[str, str, int, dict]]]:
    """``(shards to run, [(task, split, shard index, completion record)] of completed ones)``.

    Only the first ``max_examples_per_task`` rows of each file are used. Rows with a null field
    or a blank instruction are left out of their shard and listed under ``Shard.skipped``. With
    ``overwrite`` every shard is planned and the split's old output is removed first (no stale
    shards of another shard size)."""
    todo, done = [], []
    for task in tasks:
        for split in splits:
            path = Path(data) / task / f"{split}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file; prepare it with `cappy data prepare --tasks {task} "
                                        f"--out {data}`")
            table = read_split(path)
            if overwrite and (Path(out) / task / split).is_dir():
                shutil.rmtree(Path(out) / task / split)
            if max_examples_per_task is not None:
                table = table.slice(0, max_examples_per_task)
            for index, start in enumerate(range(0, table.num_rows, shard_size)):
                record = done_path(out, task, split, index)
                if record.is_file() and not overwrite:
                    done.append((task, split, index, json.loads(record.read_text())))
                    continue
                rows = table.slice(start, shard_size).to_pylist()
                keep, skipped = [], defaultdict(list)
                for pos, r in enumerate(rows):
                    where = f"{path} row {start + pos}"
                    nulls = [c for c in REQUIRED_COLUMNS if c != "references" and r[c] is None]
                    if nulls:
                        skipped["missing field"].append(f"{where}: null {', '.join(nulls)}")
                    elif not r["instruction"].strip():
                        skipped["empty instruction"].append(f"{where} ({r['task']} {r['split']} #{r['example_idx']})")
                    else:
                        r["instruction_id"] = instruction_id(r["task"], r["subtask"], r["split"], r["example_idx"])
                        r["_pos"] = pos
                        r["shard"] = f"{task}/{split}/{index:05d}"
                        keep.append(r)
                todo.append(Shard(task, split, index, pa.Table.from_pylist(keep, schema=SHARD_ROW_SCHEMA),
                                  len(rows), dict(skipped)))
    return todo, done


#: Settings that define candidates but came after outputs that lack them: those outputs had this value.
SETTINGS_ADDED_LATER = {"prompt_format": "plain"}


def check_settings(out: str | Path, settings: Mapping[str, Any], defining: Sequence[str], *,
                   overwrite: bool = False) -> None:
    """Write ``OUT/sample_config.json`` (``settings``); when one is there already and a key of
    ``defining`` differs, refuse (a ``SettingError`` of ``out``) unless ``overwrite``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "sample_config.json"
    if f.is_file() and not overwrite:
        old = {**SETTINGS_ADDED_LATER, **json.loads(f.read_text())}
        diff = [k for k in defining if old.get(k) != settings.get(k)]
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise SettingError("out", f"{out} holds candidates made with other settings ({changes}): use a new one, "
                               "or overwrite to redo the selected shards", related=["overwrite"])
    write_json(f, dict(settings), indent=2)


def write_shard(out: str | Path, shard: Shard, table: pa.Table, meta: Mapping[str, Any]) -> dict:
    """Write a shard's candidate rows (sorted back to input then candidate order by ``_pos`` and
    ``_k``, cast to :data:`~cappy_core.labeling.candidates.CANDIDATE_SCHEMA`), then its completion record
    (counts, skipped rows and ``meta``); returns the record."""
    import pyarrow.compute as pc

    if table.num_rows:
        table = table.take(pc.sort_indices(table, [("_pos", "ascending"), ("_k", "ascending")]))
        table = table.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA)
    else:
        table = CANDIDATE_SCHEMA.empty_table()
    record = done_path(out, shard.task, shard.split, shard.index)
    record.unlink(missing_ok=True)
    write_parquet(table, shard_path(out, shard.task, shard.split, shard.index))
    rec = {"shard": shard.key, "input_rows": shard.n_input, "instructions": shard.rows.num_rows,
           "rows": table.num_rows, "skipped": {k: len(v) for k, v in shard.skipped.items()},
           "skipped_rows": shard.skipped, **meta}
    write_json(record, rec, indent=2)
    return rec


def summarize(done: Sequence[dict], written: Sequence[dict], *, per_instruction: int, seconds: float,
              seconds_after_load: float | None, out: str | Path, backend: str, generator: str) -> dict:
    """The run's summary over the completion records on disk for the selected tasks and splits
    (``done``: found at the start, ``written``: by this run)."""
    per_split: dict[str, Counter] = defaultdict(Counter)
    skipped: Counter = Counter()
    for rec in list(done) + list(written):
        task, split, _ = rec["shard"].split("/")
        per_split[f"{task}/{split}"]["instructions"] += rec["instructions"]
        per_split[f"{task}/{split}"]["rows"] += rec["rows"]
        skipped.update(rec["skipped"])
    new_rows = sum(r["rows"] for r in written)
    return {
        "instructions": sum(c["instructions"] for c in per_split.values()),
        "candidates_per_instruction": per_instruction,
        "rows": sum(c["rows"] for c in per_split.values()),
        "new_instructions": sum(r["instructions"] for r in written), "new_rows": new_rows,
        "seconds": round(seconds, 2), "rows_per_s": round(new_rows / seconds, 2) if seconds > 0 else 0.0,
        "shards_written": len(written), "shards_already_done": len(done), "skipped": dict(skipped),
        "per_split": {k: dict(v) for k, v in sorted(per_split.items())}, "out": str(Path(out).resolve()),
        # from the first generator call (model loaded) to the last shard written
        "seconds_after_load": None if seconds_after_load is None else round(seconds_after_load, 2),
        "backend": backend, "generator": generator,
    }


def summary_lines(summary: Mapping[str, Any], written: Sequence[dict]) -> list[str]:
    """The lines a run reports: per split, the totals, and up to 5 skipped rows per reason and shard."""
    lines = [f"  {key}: {c['instructions']} instructions, {c['rows']} rows" for key, c in summary["per_split"].items()]
    new_rows, after_load, skipped = summary["new_rows"], summary["seconds_after_load"], summary["skipped"]
    rate_note = f"; {new_rows / after_load:.1f} rows/s once the generator was loaded" if after_load else ""
    skip_note = (", skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items()))) if skipped else ""
    lines.append(
        f"sampled {summary['new_instructions']} instructions × {summary['candidates_per_instruction']} candidates = "
        f"{new_rows} rows in {summary['seconds']:.1f}s ({summary['rows_per_s']:.1f} rows/s{rate_note}; "
        f"{summary['shards_written']} shards written, {summary['shards_already_done']} already done{skip_note}); "
        f"total {summary['instructions']} instructions, {summary['rows']} rows in "
        f"{summary['out']}/<task>/<split>/part-*.parquet")
    lines += [f"skipped ({why}): {r}" for rec in written for why, rows in rec["skipped_rows"].items() for r in rows[:5]]
    return lines
