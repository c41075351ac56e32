"""Named task sets: the paper's 45 generative BIG-Bench tasks, and the pretraining set (the rest).

Task specs accepted everywhere a task list is: ``all45``, ``pretrain``, or task names. Names are
resolved against the tasks actually present (the cache, plus a user's ``--task-dir``); an unknown
name is an error that lists close matches.

Tested in ``tests/core/test_bigbench_data.py``.
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

ALL45 = "all45"
PRETRAIN = "pretrain"


def _read_45() -> tuple[str, ...]:
    text = resources.files("cappy_core.data").joinpath("bigbench_45_tasks.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


GENERATIVE_45: tuple[str, ...] = _read_45()

# Tasks of the 45 that bigbench==1.0.0 does not ship, with how to add them.
UNAVAILABLE_OFFLINE: dict[str, str] = {
    "tellmewhy": (
        "tellmewhy is not in bigbench==1.0.0, so it is unavailable offline; to add it, pass "
        "--task-dir DIR where DIR/tellmewhy/task.json exists (a BIG-Bench checkout's "
        "bigbench/benchmark_tasks, or JSON of your own in the BIG-Bench task format)"
    ),
}


# The six small generative tasks of the sweep's local preset (and the embedded generator's check):
# tasks of the 45 on which a few-million-parameter generator trained on CPU does something.
LOCAL_TASKS: tuple[str, ...] = ("simple_text_editing", "tense", "gender_inclusive_sentences_german", "rephrase",
                                "word_sorting", "unnatural_in_context_learning")


# The ten pretraining tasks of the local preset (jobs/configs/pretrain_local.yaml; a test keeps the
# two in step): BIG-Bench tasks outside the 45, vendored with the package beside the six above.
LOCAL_PRETRAIN_TASKS: tuple[str, ...] = ("general_knowledge", "riddle_sense", "cause_and_effect", "physical_intuition",
                                         "snarks", "hindu_knowledge", "misconceptions", "strategyqa", "navigate",
                                         "periodic_elements")


def is_bigbench_task(name: str) -> bool:
    """A task name of BIG-Bench 1.0.0 (the paper's 45, the local pretraining set, the release
    manifest's when one ships); a ``--task-dir`` task of another name is not (model cards then
    list no hub dataset for it)."""
    return name in GENERATIVE_45 or name in LOCAL_PRETRAIN_TASKS or name in _manifest_tasks()


@functools.lru_cache(maxsize=1)
def _manifest_tasks() -> frozenset:
    from cappy_core.data.release import load_manifest

    return frozenset(load_manifest().tasks)


class UnknownTaskError(ValueError):
    pass


def resolve_tasks(specs: Iterable[str], available: Mapping[str, Path] | Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Expand task specs; returns (task names to use, {unavailable name: explanation}).

    ``available`` are the tasks that can be loaded. Members of the 45 that are not available are
    reported (not an error) so ``all45`` runs the 44 offline tasks; any other unknown name raises
    :class:`UnknownTaskError` with close matches.
    """
    available = set(available)
    names: list[str] = []
    unavailable: dict[str, str] = {}

    def add(name: str) -> None:
        if name not in names:
            names.append(name)

    for spec in specs:
        if spec == ALL45:
            for t in GENERATIVE_45:
                if t in available:
                    add(t)
                else:
                    unavailable[t] = UNAVAILABLE_OFFLINE.get(t, f"{t} is not in the task folders")
        elif spec == PRETRAIN:
            for t in sorted(available - set(GENERATIVE_45)):
                add(t)
        elif spec in available:
            add(spec)
        elif spec in UNAVAILABLE_OFFLINE:
            unavailable[spec] = UNAVAILABLE_OFFLINE[spec]
        else:
            close = difflib.get_close_matches(spec, sorted(available | {ALL45, PRETRAIN}), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise UnknownTaskError(
                f"unknown task {spec!r} (not {ALL45!r}, {PRETRAIN!r}, nor a task folder){hint}"
            )
    return names, unavailable


def expand_task_specs(specs: Iterable[str], available: Iterable[str]) -> set[str]:
    """The task names a recorded task list stands for, without checking them: ``pretrain`` =
    every available task outside the 45, ``all45`` = the 45, any other entry itself (a training
    run's record may name tasks this machine does not have)."""
    available = set(available)
    out: set[str] = set()
    for spec in specs:
        if spec == PRETRAIN:
            out |= available - set(GENERATIVE_45)
        elif spec == ALL45:
            out |= set(GENERATIVE_45)
        else:
            out.add(str(spec))
    return out
