"""Every BIG-Bench task this machine can load, and where each comes from: one place to ask.

Three kinds of source, later ones winning for a task they all have:

1. **vendored**: Parquet records shipped inside the package (``cappy_core/data/vendored/``,
   listed in the release manifest), prepared from the release by ``cappy data vendor``: no
   task.json needed, no network;
2. **cache**: task files ``cappy data download`` verified into ``<cache>/bigbench-1.0.0``;
3. **task dirs**: a user's own ``--task-dir DIR`` folders (``DIR/<task>/task.json``), used as
   given (``tellmewhy``, or tasks of their own in BIG-Bench's format).

Vendored records equal the ones prepared from the release's task.json files (the manifest keeps
their digest and ``cappy data vendor`` checks it), so which source serves a task changes nothing
downstream.

Tested in ``tests/core/test_bigbench_data.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cappy_core.data.cache import BigBenchNotFound, bigbench_dir
from cappy_core.data.records import SPLITS, Example, read_examples
from cappy_core.data.release import Manifest, load_manifest, vendored_dir

GET_DATA_HINT = (
    "`cappy data download` fetches tasks the package does not ship (verified against the release manifest); "
    "`cappy data download --from PATH` takes a local copy (bigbench-1.0.0.tar.gz or a folder of task files); "
    "`--task-dir DIR` adds your own DIR/<task>/task.json"
)


@dataclass
class TaskCatalog:
    """``{task name: where it loads from}``; open with :meth:`open`."""

    where: dict[str, tuple[str, Path]] = field(default_factory=dict)  # name -> (kind, path)
    manifest: Manifest = field(default_factory=Manifest)

    @classmethod
    def open(cls, cache_dir: str | Path | None = None, task_dirs: Sequence[str | Path] = (),
             manifest: Optional[Manifest] = None) -> "TaskCatalog":
        from cappy_core.data.bigbench import list_json_tasks

        manifest = manifest if manifest is not None else load_manifest()
        where: dict[str, tuple[str, Path]] = {}
        vdir = manifest.path.parent if manifest.path is not None else vendored_dir()
        for name, entry in sorted(manifest.vendored.items()):
            if (vdir / entry["file"]).is_file():
                where[name] = ("vendored", vdir / entry["file"])
        cached = bigbench_dir(cache_dir) / "benchmark_tasks"
        if cached.is_dir():
            for name, folder in list_json_tasks(cached).items():
                if _complete(manifest, cached, name):
                    where[name] = ("cache", cached)
        for d in task_dirs:
            root = Path(d).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"--task-dir {root}: no such folder")
            for name in list_json_tasks(root):
                where[name] = ("task-dir", root)
        return cls(where=where, manifest=manifest)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    @property
    def names(self) -> list[str]:
        return sorted(self.where)

    def source(self, name: str) -> str:
        kind, path = self.where[name]
        return f"{kind}: {path}"

    def require_some(self) -> "TaskCatalog":
        if not self.where:
            raise BigBenchNotFound(f"no BIG-Bench tasks on this machine: {GET_DATA_HINT}")
        return self

    def load(self, name: str) -> dict[str, list[Example]]:
        """``{"train": [...], "validation": [...]}``, as :func:`cappy_core.data.bigbench.load_task`."""
        from cappy_core.data.bigbench import load_task

        if name not in self.where:
            raise BigBenchNotFound(f"task {name!r} is not on this machine: {GET_DATA_HINT}")
        kind, path = self.where[name]
        if kind != "vendored":
            return load_task(path, name)
        rows = read_examples(path)
        return {s: [e for e in rows if e.split == s] for s in SPLITS}

    def missing(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n not in self.where]

    def resolve(self, specs: Iterable[str], *, require: bool = True) -> tuple[list[str], dict[str, str]]:
        """Expand task specs (``all45``, ``pretrain``, names) over the tasks known here: the ones this
        machine has, the release manifest's, the paper's 45 and the local preset's pretraining tasks. Returns ``(names, {unavailable:
        why})`` as :func:`cappy_core.data.tasks.resolve_tasks`; a name known nowhere raises
        :class:`~cappy_core.data.tasks.UnknownTaskError`, and (``require``) a known task that is
        not on this machine raises :class:`BigBenchNotFound` naming it and how to get it."""
        from cappy_core.data.tasks import GENERATIVE_45, LOCAL_PRETRAIN_TASKS, UNAVAILABLE_OFFLINE, resolve_tasks

        known = set(self.where) | set(self.manifest.tasks) | set(LOCAL_PRETRAIN_TASKS) | (
            set(GENERATIVE_45) - set(UNAVAILABLE_OFFLINE))
        names, unavailable = resolve_tasks(list(specs), known)
        missing = self.missing(names)
        if require and missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise BigBenchNotFound(f"BIG-Bench task(s) not on this machine: {shown}. {GET_DATA_HINT}")
        return names, unavailable


def _complete(manifest: Manifest, root: Path, name: str) -> bool:
    """A cached task counts once every file the manifest lists for it is there (a download
    interrupted between a task's subtasks leaves it incomplete, not wrong)."""
    return all((root / p).is_file() for p in manifest.task_files(name))
