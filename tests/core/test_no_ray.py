"""cappy_core is the method without Ray: every module imports with `ray` blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import cappy_core
from conftest import REPO


def test_every_cappy_core_module_imports_without_ray():
    modules = [m.name for m in pkgutil.walk_packages(cappy_core.__path__, "cappy_core.")]
    assert "cappy_core.scorer" in modules and "cappy_core.labeling" in modules
    code = "import sys, importlib\nsys.modules['ray'] = None\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in modules) + "print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_no_ray_import_in_source():
    offenders = [str(p) for p in (REPO / "cappy_core").rglob("*.py") if "import ray" in p.read_text()]
    assert offenders == []
