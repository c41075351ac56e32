"""``--push-to-hub``: a finished scorer folder to a Hugging Face model repo, and the check that
it can work, made before training rather than after it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from cappy_core.config import ConfigError


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_hub_push(repo: str) -> None:
    """Fail before training, not after, when ``--push-to-hub REPO`` cannot work: a malformed
    repo id, offline mode, no token, or no route to the hub (one ``whoami`` call)."""
    if not HUB_REPO.fullmatch(repo):
        raise ConfigError(f"--push-to-hub {repo!r}: expected a model repo id OWNER/NAME")
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it on a machine with network")
    if not get_token():
        raise ConfigError(f"--push-to-hub {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    try:
        HfApi().whoami()
    except Exception as e:  # connection refused, DNS, proxy, 401: all "cannot push from here"
        raise ConfigError(f"--push-to-hub {repo}: cannot reach the Hugging Face hub with this token "
                          f"({type(e).__name__}: {e})") from e


def push_to_hub(folder: str, repo: str, log: Callable[[str], None] = print, private: bool = False) -> str:
    """Upload a scorer folder (weights, tokenizer, cappy.json, model card) to ``repo``; its URL.
    ``private``: create the repo private (an existing repo keeps its visibility)."""
    from huggingface_hub import HfApi

    from cappy_core.scorer.train_state import TRAIN_STATE_FILE

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True, private=private)
    info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                             ignore_patterns=[TRAIN_STATE_FILE, "results.json"],  # local paths, curves
                             commit_message="Cappy scorer (cappy on Ray)")
    url = getattr(info, "repo_url", None) or f"https://huggingface.co/{repo}"
    log(f"pushed {folder} to {url}")
    return str(url)


def sweep_repos(prefix: str, tasks_dir: str | Path, tasks: list[str]) -> dict[str, Path]:
    """``{repo: folder}`` for ``cappy sweep --keep-scorers --push-to-hub ORG/PREFIX``: each task's
    kept scorer as ``ORG/PREFIX-<task>`` and its selector scorer (with the fused weights serve reads)
    as ``ORG/PREFIX-<task>-selector``."""
    out: dict[str, Path] = {}
    for task in tasks:
        for folder, suffix in (("scorer", ""), ("selector_scorer", "-selector")):
            path = Path(tasks_dir) / task / folder
            if (path / "cappy.json").is_file():
                out[f"{prefix}-{task}{suffix}"] = path
    return out


def push_sweep_scorers(prefix: str, tasks_dir: str | Path, tasks: list[str], private: bool = False,
                       log: Callable[[str], None] = print) -> dict[str, str]:
    """Push every kept scorer (:func:`sweep_repos`); ``{repo: url, or "error: ..."}``. A failed push
    is logged and the next one goes on: the sweep's results are already on disk."""
    results: dict[str, str] = {}
    for repo, folder in sweep_repos(prefix, tasks_dir, tasks).items():
        try:
            results[repo] = push_to_hub(str(folder), repo, log, private=private)
        except Exception as e:  # network, permissions, quota: the others may still go
            results[repo] = f"error: {type(e).__name__}: {e}"
            log(f"push of {folder} to {repo} failed: {type(e).__name__}: {e}")
    return results
