"""A small stand-in for a BIG-Bench release, laid out the ways its sources lay it out.

Not BIG-Bench data: made-up tasks in BIG-Bench's task.json format (a generative task, a
multiple-choice task, a task with subtasks), used to test the download sources, their
verification and ``cappy data vendor`` without the real release.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

from cappy_core.data.release import FileEntry, Manifest, git_blob_id, sha256_bytes

CANARY = "FAKE CANARY: test data in BIG-Bench's format, not BIG-Bench. canary GUID 00000000-fake"


def _task(name: str, examples: list[dict], **extra) -> bytes:
    obj = {"canary": CANARY + f" ({name})", "name": name, "description": f"fake task {name}",
           "keywords": ["fake"], "metrics": ["exact_str_match"], **extra, "examples": examples}
    return json.dumps(obj, indent=2).encode()


def release_files() -> dict[str, bytes]:
    """``{"<task>/task.json": bytes}`` of the stand-in release."""
    words = ["apple", "river", "stone", "cloud", "lamp", "bread", "glass", "horse", "paper", "salt"]
    gen = [{"input": f"Sort: {' '.join(words[i % 10:] + words[:i % 10])}", "target": " ".join(sorted(words))}
           for i in range(24)] + [{"input": f"Repeat {w} twice", "target": [f"{w} {w}", f"{w}, {w}"]} for w in words]
    mc = [{"input": f"Is {w} a fruit?", "target_scores": {"yes": float(w == "apple"), "no": float(w != "apple")}}
          for w in words] + [{"input": f"Is {w} heavy or light?", "target_scores": {"heavy": 1.0, "light": 0.0}}
                             for w in words]
    subs = {s: [{"input": f"{s} {i}", "target": f"{s}-{i}"} for i in range(20)] for s in ("alpha", "beta")}
    files = {
        "fake_sorting/task.json": _task("fake_sorting", gen),
        "fake_choice/task.json": _task("fake_choice", mc, append_choices_to_input=True),
        "fake_nested/task.json": json.dumps({"canary": CANARY + " (fake_nested)", "name": "fake_nested",
                                             "description": "container", "keywords": ["fake"]}).encode(),
    }
    for s, ex in subs.items():
        files[f"fake_nested/{s}/task.json"] = _task(s, ex)
    return files


def manifest_of(files: dict[str, bytes], revision: str | None = "fakerev") -> Manifest:
    return Manifest(revision=revision, files={
        p: FileEntry(sha256=sha256_bytes(b), git_blob=git_blob_id(b), bytes=len(b),
                     examples=len(json.loads(b).get("examples", []))) for p, b in files.items()})


def write_folder(files: dict[str, bytes], root: Path) -> Path:
    """A checkout's layout: ``root/bigbench/benchmark_tasks/<path>``; returns ``root``."""
    for p, b in files.items():
        f = root / "bigbench" / "benchmark_tasks" / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b)
    return root


def tarball_bytes(files: dict[str, bytes], prefix: str = "BIG-bench-fakerev", extra: dict[str, bytes] | None = None) -> bytes:
    """A GitHub tarball's layout: ``<prefix>/bigbench/benchmark_tasks/<path>`` (+ ``extra`` members as given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {f"{prefix}/bigbench/benchmark_tasks/{p}": b for p, b in files.items()}
        for name, data in {**members, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_zip(files: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for p, b in files.items():
            z.writestr(f"BIG-bench-main/bigbench/benchmark_tasks/{p}", b)
    return path


# --- stand-in tasks for the pipeline tests ---------------------------------------------------------

STANDIN_GENERATIVE = ("standin_tense", "standin_rephrase", "standin_sorting")
STANDIN_MULTIPLE_CHOICE = ("standin_colors", "standin_sums")
STANDIN_CANARY = "STAND-IN TEST DATA in BIG-Bench's task format, made up by tests/fake_release.py; not BIG-Bench."


def standin_task_files() -> dict[str, bytes]:
    """``{"<task>/task.json": bytes}``: three small generative and two multiple-choice tasks, enough
    examples for a train and a validation split, deterministic. The pipeline tests (sweep, sampling,
    training, eval-mc) run on these where the machine has no BIG-Bench."""
    subjects = ["I", "You", "We", "They"]
    verbs = [("walk", "walked"), ("play", "played"), ("cook", "cooked"), ("paint", "painted"), ("clean", "cleaned"),
             ("watch", "watched"), ("open", "opened"), ("visit", "visited")]
    places = ["every day", "at home", "with friends"]
    tense = [{"input": f"{s} {v} {p}. Change tense to PAST:", "target": f"{s} {past} {p}."}
             for s in subjects for v, past in verbs for p in places][:64]
    adjectives = [("big", "large"), ("quick", "fast"), ("happy", "glad"), ("small", "little"), ("hard", "difficult"),
                  ("smart", "clever"), ("angry", "mad"), ("rich", "wealthy")]
    nouns = ["The cat", "My house", "This road", "Her idea", "The test", "Our team", "That dog", "His car"]
    rephrase = [{"input": f"Rephrase the sentence: {n} is {a}.", "target": [f"{n} is {b}.", f"{n} is very {a}."]}
                for n in nouns for a, b in adjectives][:60]
    words = ["apple", "river", "stone", "cloud", "lamp", "bread", "glass", "horse", "paper", "salt", "tiger", "music"]
    picks = [[words[(i * 7) % 12], words[(i * 5 + 1) % 12], words[(i * 11 + 3) % 12], words[(i + 6) % 12]][: 2 + i % 3]
             for i in range(60)]
    sorting = [{"input": f"Sort the words alphabetically: {' '.join(p)} ({i})", "target": " ".join(sorted(p))}
               for i, p in enumerate(picks)]
    colors, things = ["red", "blue", "green", "yellow"], ["stone", "river", "table", "chair", "cloud"]
    color_mc = [{"input": f"Which of these is a color? ({i})",
                 "target_scores": {colors[i % 4]: 1.0, things[i % 5]: 0.0, things[(i + 2) % 5]: 0.0}} for i in range(40)]
    sums = [{"input": f"What is {a} + {b}?", "target_scores": {str(a + b): 1.0, str(a + b + 1): 0.0, str(a * b + 3): 0.0}}
            for a in range(2, 7) for b in range(1, 9)][:40]
    tasks = {"standin_tense": tense, "standin_rephrase": rephrase, "standin_sorting": sorting,
             "standin_colors": color_mc, "standin_sums": sums}
    return {f"{name}/task.json": json.dumps({"canary": STANDIN_CANARY, "name": name, "description": "stand-in",
                                            "keywords": ["stand-in"], "examples": ex}, indent=1).encode()
            for name, ex in tasks.items()}


def write_standin_tasks(root: Path) -> Path:
    """The stand-in tasks as a ``--task-dir`` folder (``root/<task>/task.json``); returns ``root``."""
    for rel, data in standin_task_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root
