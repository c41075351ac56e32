"""A wheel (``pip install .``, not ``-e``) carries every file the commands read, and the commands
run from it: the presets, the Serve configs, the task list, the vendored BIG-Bench records."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The project's wheel, built offline from a copy of its sources, unpacked."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("cappy_core", "jobs", "serve_app"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("cappy_ray-*.whl")
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp / "site")
    return tmp / "site"


def _data_files() -> list[str]:
    """Every non-code file under the packages, as the wheel should hold it."""
    out = []
    for pkg in ("cappy_core", "jobs", "serve_app"):
        for p in (REPO / pkg).rglob("*"):
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts:
                out.append(p.relative_to(REPO).as_posix())
    return sorted(out)


def test_the_wheel_holds_every_file_the_commands_read(wheel_dir):
    wanted = _data_files()
    assert {"jobs/configs/sweep_local.yaml", "jobs/configs/pretrain_local.yaml", "serve_app/config.yaml",
            "serve_app/config_gpu.yaml", "cappy_core/data/bigbench_45_tasks.txt"} <= set(wanted)
    from cappy_core.data.release import load_manifest

    manifest = load_manifest()  # the vendored records this build ships, if any
    wanted += [f"cappy_core/data/vendored/{e['file']}" for e in manifest.vendored.values()]
    missing = [f for f in wanted if not (wheel_dir / f).is_file()]
    assert not missing, f"not in the wheel: {missing}"


def test_the_commands_run_from_the_wheel(wheel_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_dir), "CAPPY_CACHE_DIR": str(tmp_path / "cache"),
           "RAY_AUTH_MODE": "disabled"}

    def cappy(*args):
        return subprocess.run([sys.executable, "-c", "import sys, jobs.cli; print(jobs.cli.__file__, file=sys.stderr); "
                               "sys.exit(jobs.cli.main(sys.argv[1:]))", *args],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    proc = cappy("sweep", "--preset", "local", "--dry-run", "--out", str(tmp_path / "sweep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0].startswith(str(wheel_dir))  # the wheel's code, not the checkout's
    assert "sweep plan (dry run" in proc.stdout and "estimated time" in proc.stdout
    # this build vendors no BIG-Bench and the cache is empty: missing, not "cached"
    assert "MISSING (not on this machine): 6" in proc.stdout and "tasks           cached" not in proc.stdout
    proc = cappy("serve", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"app": "cappy"' in proc.stdout and '"port": 8000' in proc.stdout
