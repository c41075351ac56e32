"""``cappy cache list`` / ``cappy cache prune`` (jobs/stage_cache_cli.py) on a stage cache built here."""

from __future__ import annotations

import os
import time

import pytest

from cappy_core.stage_cache import StageCache
from jobs.stage_cache_cli import main, parse_size


def _cache(tmp_path):
    cache = StageCache(tmp_path / "stages")
    old = time.time() - 20 * 86400
    for i in range(3):
        with cache.fill("finetune", {"i": i}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * (1 << 20))
        path = cache.path("finetune", {"i": i})
        for p in [*path.rglob("*"), path]:
            os.utime(p, (old + i * 86400, old + i * 86400))  # 20, 19 and 18 days ago
    return cache


def test_list_and_prune_from_the_command_line(tmp_path, capsys):
    cache = _cache(tmp_path)
    keys = sorted(p.name for p in (tmp_path / "stages" / "finetune").iterdir())
    assert main(["--cache-dir", str(tmp_path)], prog="cappy cache list") == 0
    text = capsys.readouterr().out
    assert "3 entries, 3.0 M" in text and all(k in text for k in keys) and "20 d ago" in text

    assert main(["--cache-dir", str(tmp_path), "--max-size", "1.5M", "--dry-run"], prog="cappy cache prune") == 0
    text = capsys.readouterr().out
    assert "would remove 2, 2.0 M" in text and len(list((tmp_path / "stages" / "finetune").iterdir())) == 3

    assert main(["--cache-dir", str(tmp_path), "--older-than", "18.5"], prog="cappy cache prune") == 0
    assert "removing 2, 2.0 M" in capsys.readouterr().out
    left = [p.name for p in (tmp_path / "stages" / "finetune").iterdir()]
    assert left == [cache.path("finetune", {"i": 2}).name]  # the most recently used stays
    assert main(["--cache-dir", str(tmp_path), "--all"], prog="cappy cache prune") == 0
    assert not list((tmp_path / "stages" / "finetune").iterdir())


def test_prune_refuses_to_guess(tmp_path, capsys):
    _cache(tmp_path)
    assert main(["--cache-dir", str(tmp_path)], prog="cappy cache prune") == 2
    assert "say what to prune" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path), "--all", "--older-than", "3"], prog="cappy cache prune") == 2
    assert "--all removes every entry not in use" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path), "--max-size", "lots"], prog="cappy cache prune") == 2
    assert "--max-size 'lots' is not a size" in capsys.readouterr().err
    assert len(list((tmp_path / "stages" / "finetune").iterdir())) == 3


@pytest.mark.parametrize("text,size", [("0", 0), ("500M", 500 << 20), ("20G", 20 << 30), ("1.5k", 1536),
                                       ("2GiB", 2 << 30), ("123", 123)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_cache_path_that_is_not_a_folder_is_named_and_a_missing_one_holds_nothing(tmp_path, capsys):
    (tmp_path / "file").write_text("not a cache")
    for command in ("cappy cache list", "cappy cache prune"):
        extra = ["--all"] if command.endswith("prune") else []
        assert main(["--cache-dir", str(tmp_path / "file"), *extra], prog=command) == 2
        assert f"{tmp_path / 'file'} is not a folder" in capsys.readouterr().err
        assert main(["--cache-dir", str(tmp_path / "nowhere"), *extra], prog=command) == 0
        assert f"no stage cache at {tmp_path / 'nowhere' / 'stages'}" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stages").write_text("")  # an empty file where the stage cache should be
    assert main(["--cache-dir", str(tmp_path / "c"), "--all"], prog="cappy cache prune") == 2
    assert f"{tmp_path / 'c' / 'stages'} is not a folder" in capsys.readouterr().err
