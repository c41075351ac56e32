"""``--log-level`` on every ``cappy`` command: parsed once in jobs/cli.py, applied before the command."""

from __future__ import annotations

import logging
import os

import pytest

from jobs import cli

ENV = ("CAPPY_LOG_LEVEL", "RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL", "VLLM_LOGGING_LEVEL",
       "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "PYTHONWARNINGS")


@pytest.fixture
def clean_logging(monkeypatch):
    """Each test applies levels on a clean environment; loggers and env come back afterwards."""
    for key in ENV:
        monkeypatch.setenv(key, "")  # recorded, so that teardown restores the key's absence too
        monkeypatch.delenv(key)
    names = ("", "cappy_core", "jobs", "serve_app", *cli.THIRD_PARTY_LOGGERS)
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, lvl in saved.items():
        logging.getLogger(n).setLevel(lvl)
    logging.captureWarnings(False)


@pytest.mark.parametrize("words", [w for w, _, _ in cli.COMMANDS], ids=lambda w: " ".join(w))
def test_every_command_takes_log_level(words, clean_logging, capsys):
    # the option may come before or after the command's own options; --help shows it
    with pytest.raises(SystemExit) as e:
        cli.main([*words, "--help", "--log-level", "error"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cappy " + " ".join(words)) and "--log-level {debug,info,warning,error}" in out
    assert os.environ["CAPPY_LOG_LEVEL"] == "error"
    assert logging.getLogger("jobs").level == logging.ERROR


@pytest.mark.parametrize("level, ours, libs", [("debug", logging.DEBUG, logging.INFO),
                                               ("info", logging.INFO, logging.ERROR),
                                               ("warning", logging.WARNING, logging.ERROR),
                                               ("error", logging.ERROR, logging.ERROR)])
def test_levels_applied_to_our_loggers_libraries_and_child_env(level, ours, libs, clean_logging):
    applied = cli.apply_log_level(level)
    assert applied["cappy_core"] == logging.getLogger("cappy_core").level == ours
    for name in ("ray", "vllm", "transformers", "py.warnings"):
        assert logging.getLogger(name).level == libs, name
    lib_name = logging.getLevelName(libs)
    assert os.environ["VLLM_LOGGING_LEVEL"] == os.environ["RAY_DATA_LOG_LEVEL"] == lib_name
    assert os.environ["TRANSFORMERS_VERBOSITY"] == os.environ["RAY_LOGGER_LEVEL"] == lib_name.lower()
    assert ("PYTHONWARNINGS" in os.environ) == (level != "debug")


def test_default_is_info_and_user_env_wins(clean_logging, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # set by the user: kept
    level, rest = cli.split_log_level(["sweep", "--preset", "local", "--", "--log-level"])
    assert (level, rest) == ("info", ["sweep", "--preset", "local", "--", "--log-level"])
    cli.apply_log_level(level)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert cli.split_log_level(["score", "--log-level=WARNING", "--scorer", "x"]) == ("warning", ["score", "--scorer", "x"])


@pytest.mark.parametrize("argv", [["score", "--log-level", "loud"], ["score", "--log-level"]])
def test_bad_log_level_is_one_error_line(argv, clean_logging, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cappy: error: --log-level") and "debug, info, warning, error" in err
