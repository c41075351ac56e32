"""serve_app pieces that need no running Serve: args, configs, decoding plans, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from conftest import REPO

from serve_app.args import AppArgs, resolve_task_scorer


@pytest.mark.parametrize("name", ["config.yaml", "config_gpu.yaml"])
def test_shipped_serve_configs_validate_and_build(name):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import app_builder

    data = yaml.safe_load((REPO / "serve_app" / name).read_text())
    ServeDeploySchema.model_validate(data)
    (app,) = data["applications"]
    assert app["import_path"] == "serve_app.app:app_builder"
    assert app_builder(app["args"]) is not None


def test_app_args_refuse_unknown_keys_and_name_them():
    with pytest.raises(ValueError, match="max_batch_sise"):
        AppArgs.model_validate({"scorer": {"max_batch_sise": 4}})
    with pytest.raises(ValueError, match="num_replicas or autoscaling_config"):
        AppArgs.model_validate({"generator": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}})
    # a fixed replica count replaces the scorer's default autoscaling
    assert AppArgs.model_validate({"scorer": {"num_replicas": 2}}).scorer.deployment_options()["num_replicas"] == 2


def test_app_builder_accepts_flat_cli_args():
    from serve_app.app import unflatten_args

    assert unflatten_args({"generator.max_new_tokens": "8", "scorer": {"model": "x"}}) == {
        "generator": {"max_new_tokens": 8}, "scorer": {"model": "x"}}


def test_defaults_are_the_papers():
    from cappy_core.generation import PAPER_DECODING_NAMES

    args = AppArgs()
    assert args.ingress.default_decodings == list(PAPER_DECODING_NAMES) == ["beam4", "sample", "temp0.9", "topk40",
                                                                            "topp0.95"]
    assert (args.ingress.default_num_samples, args.generator.max_new_tokens, args.generator.min_new_tokens) == (4, 64, 3)


def test_task_scorer_resolution(tmp_path):
    (tmp_path / "tense").mkdir()
    (tmp_path / "tense" / "config.json").write_text("{}")
    (tmp_path / "finetune-rephrase" / "scorer").mkdir(parents=True)
    (tmp_path / "finetune-rephrase" / "scorer" / "config.json").write_text("{}")
    assert resolve_task_scorer("tense", {}, str(tmp_path)) == str(tmp_path / "tense")
    assert resolve_task_scorer("rephrase", {}, str(tmp_path)) == str(tmp_path / "finetune-rephrase" / "scorer")
    assert resolve_task_scorer("tense", {"tense": "/x"}, str(tmp_path)) == "/x"
    assert resolve_task_scorer("other", {}, str(tmp_path)) is None
    with pytest.raises(ValueError):
        resolve_task_scorer("../etc", {}, str(tmp_path))


class _Hang:
    cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        _Hang.cancelled = True


def test_call_with_deadline_times_out_and_retries_dead_replicas():
    from ray.exceptions import RayActorError

    from serve_app.ingress import Unavailable, call_with_deadline

    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer within 0.2 s"):
        asyncio.run(call_with_deadline(_Hang, "scorer", 0.2, 2))
    assert time.monotonic() - t0 < 2 and _Hang.cancelled

    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RayActorError()
        return "ok"

    assert asyncio.run(call_with_deadline(lambda: flaky(), "scorer", 5, 2)) == "ok" and len(calls) == 2

    async def broken():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(Unavailable, match="scorer failed: RuntimeError: CUDA out of memory"):
        asyncio.run(call_with_deadline(lambda: broken(), "scorer", 5, 2))


def test_cappy_serve_dry_run(capsys, tmp_path):
    import json

    from jobs.serve import main

    assert main(["--dry-run", "--port", "8765", "--scorers-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"] == "127.0.0.1" and out["port"] == 8765
    assert out["args"]["scorer"]["scorers_dir"] == str(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: serve_app.app:app_builder\n"
                   "    args: {scorer: {modle: minilm}}\n")
    assert main(["--dry-run", "--config", str(bad)]) == 2
    assert "modle" in capsys.readouterr().err
