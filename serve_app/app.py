"""The application: ``Ingress.bind(Generator.bind(...), Scorer.bind(...))``.

    serve run serve_app/config.yaml                           # local, 127.0.0.1:8000
    serve deploy serve_app/config_gpu.yaml                    # a running cluster
    serve run serve_app.app:app_builder generator.model=...   # (Serve passes key=value args flat)
    cappy serve                                               # the embedded default, locally

:func:`app_builder` is the ``import_path`` target (``serve_app.app:app_builder``) of the config
files and of a RayService's ``serveConfigV2``; its ``args`` are :class:`serve_app.args.AppArgs`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.args import AppArgs
from serve_app.generator import GeneratorDeployment
from serve_app.ingress import IngressDeployment
from serve_app.scorer import ScorerDeployment


UNTRAINED_SCORER_WARNING = ("the default scorer is MiniLM with an untrained head: its picks mean nothing; serve a "
                            "pretrained scorer (cappy pretrain, or the sweep's)")
CONSENSUS_WARNING = ("no trained scorer on this machine: the default pick is the candidate that agrees most with the "
                     "others (MBR), not Cappy's; serve a pretrained scorer (cappy pretrain, or the sweep's) for Cappy's picks")


def build_app(args: AppArgs) -> Application:
    g, s, i = args.generator, args.scorer, args.ingress
    generator = GeneratorDeployment.options(**g.deployment_options(), user_config=g.user_config()).bind(
        backend=g.backend, model=g.model, load_kwargs=g.load_kwargs, max_new_tokens=g.max_new_tokens,
        min_new_tokens=g.min_new_tokens, seed=g.seed)
    scorer = ScorerDeployment.options(**s.deployment_options(), user_config=s.user_config()).bind(
        s.model, dtype=s.dtype, device=s.device, max_length=s.max_length, seed=s.seed,
        task_scorers=s.task_scorers, scorers_dir=s.scorers_dir, unknown_task=s.unknown_task,
        max_models_per_replica=s.max_models_per_replica, score_batch_size=s.score_batch_size,
        score_max_tokens=s.score_max_tokens, torch_threads=s.torch_threads, selector=s.selector)
    warnings = []
    if s.model == "minilm":
        warnings.append(CONSENSUS_WARNING if s.selector and not s.selector.get("cappy") else UNTRAINED_SCORER_WARNING)
    limits = i.limits()
    if limits["max_generating"] is None:  # admit what the Generator holds; refuse the rest at once
        limits["max_generating"] = g.capacity()
    return IngressDeployment.options(**i.deployment_options()).bind(generator, scorer, limits=limits,
                                                                    warnings=warnings)


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """``import_path`` entry: validate ``args`` (unknown keys are an error) and build the app.

    Nested keys may also come flat as ``section.key=value`` (what ``serve run ... k=v`` passes).
    """
    return build_app(AppArgs.model_validate(unflatten_args(dict(args or {}))))


def unflatten_args(args: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` → ``{"section": {"key": value}}``; a string value of a dotted
    key is parsed as YAML (``"2"`` → 2, ``"true"``, ``"[a, b]"``), as ``serve run ... k=v`` gives."""
    import yaml

    out: dict[str, Any] = {}
    for key, value in args.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if isinstance(value, str):  # from the command line: parse "2", "true", "[a, b]"
                value = yaml.safe_load(value)
            out.setdefault(section, {})[sub] = value
        elif isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out
