"""Every shipped YAML file loads the way its command loads it: each ``jobs/configs/<job>_<preset>.yaml``
through its job's config dataclass (``--preset NAME``: defaults < preset, then the dataclass's own
checks), each ``serve_app/*.yaml`` as a Serve config whose import path imports and builds. A YAML
file that no job claims fails: no command could ever load it (a typo in its name, a leftover).

Written against the generic loading path (:func:`jobs.cli.presets`, :func:`cappy_core.config.build_parser`
and :func:`~cappy_core.config.config_from_args`, what every job's ``main`` runs), never against a
job's field names, so a config dataclass can be restructured without touching this file."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from conftest import REPO

#: preset → job, explicitly: the file prefix (``<job>_<preset>.yaml``), the module whose command runs
#: it, and that module's config dataclass. A new job with presets adds its line here.
PRESET_JOBS = {
    "finetune": ("jobs.finetune", "FinetuneConfig"),        # cappy finetune --preset NAME
    "generator": ("jobs.train_generator", "GeneratorConfig"),  # cappy generator train --preset NAME
    "pretrain": ("jobs.pretrain", "PretrainConfig"),        # cappy pretrain --preset NAME
    "sweep": ("jobs.sweep", "SweepConfig"),                 # cappy sweep --preset NAME
}
#: ``serve_app/*.yaml``: Serve configs (``cappy serve --serve-config FILE``, ``serve run FILE``).
SERVE_JOB = "jobs.serve"

CONFIG_DIR = REPO / "jobs" / "configs"
SERVE_DIR = REPO / "serve_app"


def _yamls(folder: Path) -> list[Path]:
    # .yml and nested files too: neither is a preset any job finds, so each must fail below
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml"))


PRESET_FILES = _yamls(CONFIG_DIR)
SERVE_FILES = _yamls(SERVE_DIR)


def _claims() -> dict[Path, list[tuple[str, str]]]:
    """``{file: [(job, preset)]}`` as the jobs find their presets (``jobs.cli.presets``)."""
    from jobs.cli import presets

    out: dict[Path, list[tuple[str, str]]] = {}
    for job in PRESET_JOBS:
        for name, path in presets(job).items():
            out.setdefault(Path(path).resolve(), []).append((job, name))
    return out


def test_every_preset_file_is_claimed_by_exactly_one_job():
    from jobs.cli import CONFIG_DIR as shipped

    assert Path(shipped).resolve() == CONFIG_DIR.resolve()
    assert PRESET_FILES and SERVE_FILES
    claims = _claims()
    unclaimed = [p.relative_to(CONFIG_DIR).as_posix() for p in PRESET_FILES if p.resolve() not in claims]
    assert not unclaimed, (f"no job claims {unclaimed} in jobs/configs: "
                           "name it <job>_<preset>.yaml for a job in PRESET_JOBS")
    twice = {p.name: c for p, c in claims.items() if len(c) > 1}
    assert not twice, f"claimed by several jobs: {twice}"
    assert {job for c in claims.values() for job, _ in c} == set(PRESET_JOBS)  # every job listed has presets


@pytest.mark.parametrize("job", sorted(PRESET_JOBS))
def test_each_jobs_command_offers_its_presets(job, capsys):
    """The mapping above is the commands' own: ``--help`` of the job's module lists these presets."""
    from jobs.cli import presets

    module = importlib.import_module(PRESET_JOBS[job][0])
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code in (0, None)
    assert "--preset {" + ",".join(sorted(presets(job))) + "}" in capsys.readouterr().out


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_preset_loads_through_its_jobs_config(path):
    from cappy_core.config import build_parser, config_from_args, is_section, load_yaml
    from jobs.cli import presets

    claims = _claims().get(path.resolve())
    if not claims:
        pytest.fail(f"jobs/configs/{path.relative_to(CONFIG_DIR).as_posix()}: no job claims it "
                    f"(<job>_<preset>.yaml, jobs: {sorted(PRESET_JOBS)})")
    ((job, name),) = claims
    module, cls_name = PRESET_JOBS[job]
    cls = getattr(importlib.import_module(module), cls_name)
    assert dataclasses.is_dataclass(cls)
    shipped = presets(job)
    # what the job's main does: its parser (with --preset), then defaults < preset < --config < flags
    parser = build_parser(cls, prog=f"cappy {job}", description="", presets=shipped)
    cfg = config_from_args(cls, parser.parse_args(["--preset", name]), shipped)
    assert type(cfg) is cls
    # and every value the file sets is the config's (sections key by key): none is dropped or renamed
    for key, value in load_yaml(cls, path).items():
        got = getattr(cfg, key)
        if isinstance(value, dict) and is_section(type(got)):
            for sub, v in value.items():
                assert getattr(got, sub) == v, f"{path.name}: {key}.{sub}"
        else:
            assert got == value, f"{path.name}: {key}"


def _import_path(target: str):
    """Ray Serve's ``import_path``: ``module.sub:attr`` or ``module.sub.attr``."""
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: p.relative_to(SERVE_DIR).as_posix())
def test_serve_config_validates_and_its_import_path_imports(path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    serve = importlib.import_module(SERVE_JOB)
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)  # what `serve deploy` checks
    assert schema.applications, f"{path.name}: no applications"
    for app in data["applications"]:
        target = _import_path(app["import_path"])
        # an application builder takes the args (validating them) and returns the app; a bound app is one
        built = target if isinstance(target, Application) else target(app.get("args") or {})
        assert isinstance(built, Application), f"{path.name}: {app['import_path']} gave {type(built).__name__}"
        # the job that claims Serve configs reads the file the same way (`cappy serve --serve-config FILE --dry-run`)
        _, entry, _ = serve.resolve(serve.build_parser().parse_args(
            ["--serve-config", str(path), "--app", app["name"], "--dry-run"]))
        assert entry == app
