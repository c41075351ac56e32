"""The full log under OUT (jobs/log_file.py): what --log-level hides from the terminal is in the file."""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings

import pytest

from jobs import cli
from jobs.log_file import init_ray, log_file


@pytest.fixture
def terminal(monkeypatch):
    """``cappy``'s logging at the default level, with its console handler writing into a buffer."""
    for key in ("CAPPY_LOG_LEVEL", "RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL", "VLLM_LOGGING_LEVEL",
                "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "PYTHONWARNINGS"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    names = ("", *cli.THIRD_PARTY_LOGGERS, "cappy_core", "jobs", "serve_app", "transformers.modeling_utils")
    saved = {n: logging.getLogger(n).level for n in names}
    import ray  # noqa: F401  (imported first, so that what its import does to the "ray" logger is undone below)

    ray_logger = logging.getLogger("ray")  # as before `import ray` (which gives it a handler of its own and
    monkeypatch.setattr(ray_logger, "handlers", [])  # stops propagation): what earlier tests did to it is undone
    monkeypatch.setattr(ray_logger, "propagate", True)
    buf = io.StringIO()
    console = logging.StreamHandler(buf)
    logging.getLogger().addHandler(console)
    cli.apply_log_level("info")
    yield buf
    logging.getLogger().removeHandler(console)
    for n, lvl in saved.items():
        logging.getLogger(n).setLevel(lvl)
    logging.captureWarnings(False)


def test_file_holds_what_the_terminal_hides_and_levels_come_back(tmp_path, terminal, capsys):
    jobs_log = logging.getLogger("jobs.demo")
    with log_file(tmp_path, "demo") as log:
        log("== stage one")
        jobs_log.debug("debug detail 42")
        jobs_log.info("info line 43")
        logging.getLogger("transformers.modeling_utils").warning("Some weights were newly initialized")
        logging.getLogger("ray").error("ray error 44")
        warnings.warn("deprecated thing 45", UserWarning)
        with log_file(tmp_path / "inner", "nested", log) as inner:  # a job inside a job (given its log): same file
            inner("== nested stage")
    jobs_log.debug("after the block 46")

    files = list((tmp_path / "logs").glob("demo-*.log"))
    assert len(files) == 1 and not (tmp_path / "inner").exists()
    text = files[0].read_text()
    out = capsys.readouterr().out
    assert out.splitlines() == [f"log file: {files[0]}", "== stage one", "== nested stage"]
    # the terminal: our INFO and the libraries' ERROR, as at --log-level info without a file
    shown = terminal.getvalue()
    assert "info line 43" in shown and "ray error 44" in shown
    for hidden in ("debug detail 42", "Some weights", "deprecated thing 45", "== stage one", "command:"):
        assert hidden not in shown, hidden
    # the file: all of it, stage lines included, with levels and logger names
    for line in ("DEBUG jobs.demo: debug detail 42", "INFO jobs.demo: info line 43",
                 "WARNING transformers.modeling_utils: Some weights were newly initialized",
                 "ERROR ray: ray error 44", "INFO jobs.log_file: == stage one", "INFO jobs.log_file: == nested stage",
                 "DEBUG jobs.log_file: command: "):
        assert line in text, line
    assert "WARNING py.warnings:" in text and "deprecated thing 45" in text
    assert "after the block 46" not in text
    assert logging.getLogger("jobs").level == logging.INFO and logging.getLogger("transformers").level == logging.ERROR
    assert not [h for h in logging.getLogger().handlers if str(tmp_path) in getattr(h, "baseFilename", "")]
    assert not [h for h in logging.getLogger().handlers if h.filters]


def test_a_failure_leaves_its_traceback_in_the_file_only(tmp_path, terminal):
    with pytest.raises(ValueError, match="bad 47"), log_file(tmp_path, "demo"):
        raise ValueError("bad 47")
    text = next((tmp_path / "logs").glob("demo-*.log")).read_text()
    assert "ERROR jobs.log_file: demo failed" in text and "Traceback" in text and "ValueError: bad 47" in text
    assert "bad 47" not in terminal.getvalue()  # run_main prints the one-line error


@pytest.mark.parametrize("imported", ["inside the block", "before the block"])
def test_rays_driver_log_reaches_the_file_after_ray_init_and_not_the_terminal(tmp_path, terminal, capsys,
                                                                             monkeypatch, request, imported):
    """``import ray`` and ``ray.init`` set up the "ray" logger (a stderr handler of its own, no
    propagation, the level of RAY_LOGGER_LEVEL, Ray's formatter on its handlers) and ray.init logs
    "Started a local Ray instance"; simulated with Ray's own functions (a real ray.init here would
    start a second cluster)."""
    import ray
    from ray._private import log as ray_log
    from ray._private import ray_constants
    from ray._private.ray_logging import setup_logger

    def ray_init(logging_level=os.environ["RAY_LOGGER_LEVEL"]):  # ray._private.worker.init, as to the "ray" logger
        setup_logger(logging_level, ray_constants.LOGGER_FORMAT)
        logging.getLogger("ray._private.worker").info(  # Ray colours the address for the terminal
            "Started a local Ray instance 48 at %s", "\x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)
    # init_ray starts its own Ray through jobs.local_ray, which switches Ray to loopback-only: undone afterwards
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setattr(ray_log, "logger_initialized", False)
    request.addfinalizer(functools.partial(logging.setLogRecordFactory, logging.getLogRecordFactory()))
    if imported == "before the block":
        ray_log.generate_logging_config()  # what `import ray` does to the "ray" logger
    level_before = logging.getLogger("ray").level
    with log_file(tmp_path, "demo"):
        if imported == "inside the block":  # as in the jobs (they import ray lazily)
            ray_log.generate_logging_config()
        init_ray()
        logging.getLogger("ray").info("ray info 49")
        logging.getLogger("ray").error("ray error 50")

    text = next((tmp_path / "logs").glob("demo-*.log")).read_text()
    # in the file's format, not Ray's, and without colour codes
    assert "INFO ray._private.worker: Started a local Ray instance 48 at http://127.0.0.1:8265 \n" in text
    assert "\x1b" not in text
    assert "INFO ray: ray info 49" in text and "ERROR ray: ray error 50" in text
    assert "-- Started" not in text  # Ray's format ("%(filename)s:%(lineno)s -- %(message)s")
    err = capsys.readouterr().err  # Ray's own handler writes to stderr
    assert "ray error 50" in err
    assert "Started a local Ray instance" not in err + terminal.getvalue() and "ray info 49" not in err
    ray_logger = logging.getLogger("ray")
    assert ray_logger.level == level_before
    assert [type(h).__name__ for h in ray_logger.handlers] == ["PlainRayHandler"] and not ray_logger.handlers[0].filters


def test_a_sweep_that_fails_early_leaves_its_config_stages_and_traceback_under_out(tmp_path, terminal, capsys):
    from jobs import sweep

    out = tmp_path / "sweep"
    assert sweep.main(["--tasks", "no_such_task", "--out", str(out)]) == 2  # fails in the data stage, no Ray
    (log,) = (out / "logs").glob("sweep-*.log")
    printed = capsys.readouterr()
    assert printed.out.splitlines()[:2] == [f"log file: {log}", f"== sweep into {out}"]
    assert "no_such_task" in printed.err and "Traceback" not in printed.err + terminal.getvalue()
    text = log.read_text()
    assert 'DEBUG jobs.sweep: config: {"report_to": "none", ' in text and '"tasks": ["no_such_task"]' in text
    assert f"INFO jobs.log_file: == sweep into {out}" in text
    assert "ERROR jobs.log_file: sweep failed\nTraceback" in text and "no_such_task" in text.split("Traceback")[1]
