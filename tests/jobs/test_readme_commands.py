"""CI must install and test exactly as README.md says: the commands are the same lines."""

from __future__ import annotations

import re

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, re.S)]


def test_ci_runs_readme_install_and_test_commands():
    install, main_job, tests = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci
    assert "-c constraints/cpu.txt" in install and "pytest" in tests
    # the CPU wheel's exact pin lives in the constraints file, never in the library's dependencies
    pins = [l for l in (REPO / "constraints" / "cpu.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert pins == ["torch==2.13.0"]
    assert main_job.startswith("cappy ")
