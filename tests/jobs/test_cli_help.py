"""Honest help (``jobs/cli.py``, ``cappy_core/config.py``): every config-driven command shows its
choices and, after ``--preset NAME``, that preset's values in ``--help``; ``--print-config`` prints
YAML that ``--config`` reads back; every command group answers ``--help``; a closed stdout ends a
command quietly; the baseline count the CLI states is the one the report produces."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

import cappy_core.config as config
from jobs.cli import COMMANDS, main, presets

@pytest.fixture(autouse=True)
def _cli_state_restored():
    """``cli.main`` in this process sets log levels, warning capture and environment variables
    (``apply_log_level``): later tests must find them as they were."""
    from jobs.cli import THIRD_PARTY_LOGGERS

    names = ["", "cappy_core", "jobs", "serve_app", *THIRD_PARTY_LOGGERS]
    levels = {name: logging.getLogger(name).level for name in names}
    env = dict(os.environ)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)
    os.environ.clear()
    os.environ.update(env)


#: The commands built on cappy_core.config (every one but `cappy serve`, whose flags are its own).
JOBS = [(words, module) for words, module, _ in COMMANDS if module != "jobs.serve"]
NAMES = [" ".join(w) for w, _ in JOBS]


def _help(module: str, argv: list[str], capsys, monkeypatch, prog: str = "cappy x") -> tuple[str, type]:
    """``module``'s ``--help`` text and the config dataclass its parser was built from."""
    seen = []
    real = config.add_dataclass_arguments
    monkeypatch.setattr(config, "add_dataclass_arguments",
                        lambda parser, cls, shown=None: (seen.append(cls), real(parser, cls, shown)))
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv + ["--help"], prog=prog)
    assert e.value.code == 0
    assert len(seen) == 1
    return capsys.readouterr().out, seen[0]


def _choice_fields(cls: type, prefix: str = ""):
    hints = config._field_types(cls)
    for f in dataclasses.fields(cls):
        if config.is_section(hints[f.name]):
            yield from _choice_fields(hints[f.name], f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            yield prefix + f.name, f.metadata["choices"]


@pytest.mark.parametrize("words,module", JOBS, ids=NAMES)
def test_every_job_help_lists_each_settings_choices_and_print_config(words, module, capsys, monkeypatch):
    text, cls = _help(module, [], capsys, monkeypatch, prog="cappy " + " ".join(words))
    assert "--print-config" in text
    for name, choices in _choice_fields(cls):
        assert f"{config.flag_name(name)} {{{','.join(choices)}}}" in text, name


def test_report_to_and_backend_show_their_choices(capsys, monkeypatch):
    text, _ = _help("jobs.sweep", [], capsys, monkeypatch)
    assert re.search(r"--report-to \{none,[a-z,]*mlflow", text) and "--backend {vllm,hf}" in text


def _backend_help(text: str) -> str:
    return re.search(r"\n  --backend \{vllm,hf\}(.*?)\n  --", text, re.S).group(1)


def test_help_after_a_preset_shows_the_presets_values(capsys, monkeypatch):
    local = yaml.safe_load(presets("sweep")["local"].read_text())
    assert local["backend"] != "vllm" and local["max_examples_per_task"] != 40  # else this test shows nothing
    plain, _ = _help("jobs.sweep", [], capsys, monkeypatch)
    assert "'vllm'" in _backend_help(plain) and "Defaults shown" not in plain
    shown, _ = _help("jobs.sweep", ["--preset", "local"], capsys, monkeypatch)
    assert f"'{local['backend']}'" in _backend_help(shown)
    assert f"(default: {local['max_examples_per_task']})" in shown
    assert "Defaults shown are the values of --preset local (sweep_local.yaml)" in shown


def _print_config(words, argv, capsys) -> str:
    assert main([*words, *argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("words,module", JOBS, ids=NAMES)
def test_print_config_reads_back_to_the_same_config(words, module, tmp_path, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"], prog="cappy " + " ".join(words))
    offers_presets = "[--preset" in capsys.readouterr().out  # `generator train` does, `generator fetch` not
    argv = ["--preset", sorted(presets(words[0]))[0]] if presets(words[0]) and offers_presets else []
    printed = _print_config(words, argv, capsys)
    assert isinstance(yaml.safe_load(printed), dict)
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert _print_config(words, ["--config", str(saved)], capsys) == printed


def test_print_config_resolves_defaults_preset_config_and_flags_without_running(tmp_path, capsys):
    from jobs.sweep_config import SweepConfig

    extra = tmp_path / "extra.yaml"
    extra.write_text("task_retries: 5\n")
    argv = ["--preset", "local", "--config", str(extra), "--sampling.seed", "7"]
    printed = _print_config(["sweep"], argv, capsys)  # no Ray, no output folder: it only prints
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    expected = config.build(SweepConfig, config.merge(config.merge(
        config.load_yaml(SweepConfig, presets("sweep")["local"]), config.load_yaml(SweepConfig, extra)),
        {"sampling": {"seed": 7}}))
    assert config.build(SweepConfig, config.load_yaml(SweepConfig, saved)) == expected
    assert expected.task_retries == 5 and expected.sampling.seed == 7


GROUPS = sorted({w[0] for w, _, _ in COMMANDS if len(w) > 1})


@pytest.mark.parametrize("group", GROUPS)
def test_every_command_group_answers_help(group, capsys):
    subs = [" ".join(w) for w, _, _ in COMMANDS if w[0] == group]
    for flag in ("--help", "-h"):
        assert main([group, flag]) == 0
        out = capsys.readouterr().out
        assert all(s in out for s in subs) and f"usage: cappy {group}" in out
    assert main([group]) == 2  # no command: its help, on stderr, as git does
    err = capsys.readouterr().err
    assert all(s in err for s in subs)
    assert main([group, "nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_group_help_through_the_entry_point():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "data", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "data prepare" in proc.stdout


@pytest.mark.parametrize("argv", [["jobs.cli", "finetune", "--help"], ["jobs.cli", "--help"],
                                  ["jobs.cli", "sweep", "--print-config"], ["jobs.finetune", "--print-config"],
                                  ["jobs.train_generator", "--print-config"]])
def test_a_closed_stdout_ends_the_command_quietly(argv):
    """`cappy ...` and every `python -m jobs.<job>` (Ray's job entry points)."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_baseline_count_is_the_reports():
    from cappy_core.generation import PAPER_DECODING_NAMES
    from cappy_core.selection.evaluation import baseline_methods

    n = len(baseline_methods(PAPER_DECODING_NAMES))
    sweep_help = next(h for w, _, h in COMMANDS if w == ("sweep",))
    assert re.search(r"(\d+) baselines", sweep_help).group(1) == str(n)
    words = {7: "seven", 8: "eight", 9: "nine"}
    readme = (REPO / "README.md").read_text()
    assert f"against the {words[n]} baselines" in readme


@pytest.mark.parametrize("bench", ["scorer", "train", "labeling", "chaos"])
def test_every_benchmark_prints_its_config_and_runs_nothing(bench, capsys):
    """`python -m jobs.bench.<name> --print-config`: the resolved YAML, exit 0, no benchmark run
    (the benchmarks used to ignore the flag and start measuring)."""
    import importlib

    import yaml

    module = importlib.import_module(f"jobs.bench.{bench}")
    assert "--print-config" in module_help(module, capsys)
    assert module.main(["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and printed


def module_help(module, capsys) -> str:
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return capsys.readouterr().out
