"""cappy_core is the method without Ray: no module imports ``ray`` (parsed, not grepped), and
every module imports with ``ray`` blocked."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys

import cappy_core
from conftest import REPO


def ray_imports(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: statement`` for every ``import ray``/``import ray.x``/``from ray[.x] import ...``
    anywhere in ``source`` (module level, functions, classes, ``try`` blocks)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(n == "ray" or n.startswith("ray.") for n in names):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_every_form_of_ray_import():
    snippet = ("import os\nfrom ray import data\nimport numpy, ray.train as t\n"
               "def f():\n    from ray.util import placement_group\n"
               "class C:\n    try:\n        import ray\n    except ImportError:\n        pass\n")
    assert [f.split(": ", 1)[0] for f in ray_imports(snippet, "x.py")] == [
        "x.py:2", "x.py:3", "x.py:5", "x.py:8"]
    assert ray_imports("import rayon\nfrom raylib import x\nfrom . import ray\nx = 'import ray'\n") == []


def test_no_ray_import_in_source():
    files = sorted((REPO / "cappy_core").rglob("*.py"))
    assert any(f.name == "model.py" and f.parent.name == "scorer" for f in files)
    offenders = [hit for f in files for hit in ray_imports(f.read_text(), str(f.relative_to(REPO)))]
    assert offenders == []


def test_every_cappy_core_module_imports_without_ray():
    modules = [m.name for m in pkgutil.walk_packages(cappy_core.__path__, "cappy_core.")]
    assert "cappy_core.scorer.model" in modules and "cappy_core.labeling.rouge" in modules
    code = "import sys, importlib\nsys.modules['ray'] = None\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in modules) + "print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
