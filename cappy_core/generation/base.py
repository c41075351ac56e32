"""What every generation backend shares: the :class:`Candidate` record and the :class:`Generator`
front end (input checks, prompt encoding, seeds, candidate records), so that a backend only decodes
token ids and the two backends cannot drift apart on anything else.

What both backends do the same way
----------------------------------
* **Prompt**: causal models read ``prompt_text(instruction)`` (``instruction + "\\n"``, BOS from
  the tokenizer), seq2seq models the instruction itself. Both tokenise with the model's Hugging
  Face tokenizer, so prompt token ids are identical across backends.
* **Truncation** to ``max_prompt_tokens`` (paper: 512) keeps the *end* of the prompt (special
  tokens are kept): BIG-Bench inputs put few-shot examples and context first and the question and
  its ``A:`` cue last, and the cue is what the answer must follow. (The embedded generator is
  trained with the same left truncation.)
* **Decodings** (:data:`PAPER_DECODINGS`, 17 candidates): beam search with 4 beams once (the best
  beam), then 4 samples each of plain sampling, temperature 0.9, top-k 40 and nucleus p 0.95; at
  least ``min_new_tokens`` (3) tokens before end-of-sequence, at most ``max_new_tokens`` (64).
  Beam search is Hugging Face's (scores = summed log-probabilities / generated length **
  ``length_penalty``, ``early_stopping=False``); the vLLM backend runs the same algorithm.
* **Seeds**: sample ``j`` of decoding ``d`` for the instruction with key ``k`` uses seed
  :func:`candidate_seed` ``(seed, k, d) + j`` (vLLM's own rule for ``SamplingParams(n, seed)``),
  so a run is reproducible whatever the batching, and samples 2..3 asked alone
  (``DecodingSpec.first_sample=2``) are those of a call asking for 0..3; the key defaults to the
  instruction text.
* **Log-likelihood**: ``logprob_sum`` is the model's own log-probability of the candidate's
  tokens at temperature 1 with nothing truncated (raw ``log_softmax`` of the logits, whatever
  decoding produced it), counting the end-of-sequence token when the candidate ended with one;
  ``logprob_mean = logprob_sum / num_tokens``. ``Generator.loglik`` scores any given response the
  same way.
* Text is ``tokenizer.decode(tokens without the end-of-sequence token, skip_special_tokens=True)``.
* The model's ``generation_config.json`` (repetition penalties, default temperatures, …) is not
  applied: a :class:`DecodingSpec` alone defines a decoding.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Awaitable, Sequence

from cappy_core.generation.decoding import (
    MAX_NEW_TOKENS,
    MIN_NEW_TOKENS,
    PAPER_DECODINGS,
    DecodingSpec,
    candidate_seed,
)
from cappy_core.generation.embedded_model import prompt_text

#: The paper's prompt length: prompts keep their last 512 tokens (unless a generator folder says it
#: was trained on fewer).
DEFAULT_PROMPT_TOKENS = 512
# How the transformers backend keeps a prompt's keys and values while it decodes (hf_backend):
# shared, once for all of the prompt's rows (the default where the model allows it); cached,
# repeated for every row; generate, model.generate per sampling decoding.
DECODE_LOOPS = ("shared", "cached", "generate")


def check_backend_settings(max_prompt_tokens: int, decode_loop: str | None = None) -> None:
    """The checks of the settings every backend takes, in one place: :class:`GeneratorSpec` runs them
    before anything loads, a backend constructed directly runs them itself."""
    if max_prompt_tokens < 2:
        raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
    if decode_loop is not None and decode_loop not in DECODE_LOOPS:
        raise ValueError(f"decode_loop must be one of {', '.join(DECODE_LOOPS)}, got {decode_loop!r}")


@dataclass(frozen=True)
class Candidate:
    """One generated response. ``num_tokens`` counts the generated tokens including a final
    end-of-sequence token; ``logprob_sum``/``logprob_mean`` are the generator's raw
    log-likelihood of those tokens (see the module docstring)."""

    text: str
    decoding: str
    sample_idx: int
    num_tokens: int
    logprob_sum: float
    logprob_mean: float
    #: the generated token ids (with the end-of-sequence id when it ended with one)
    token_ids: tuple[int, ...] = field(default=(), compare=False, repr=False)


class Generator(ABC):
    """Shared front end of the backends: validation, prompt encoding, seeds, candidate records.

    A backend implements :meth:`_run_samples` (greedy and sampling decodings), :meth:`_run_beam`
    and :meth:`_token_logprobs_ids`, all on token ids (:meth:`_run_decodings` runs the first two; a backend
    may override it to run them together) (and :meth:`_arun_samples` / :meth:`_arun_beam`
    for :meth:`agenerate` when it has an async engine), and sets ``tokenizer``, ``eos_ids``,
    ``is_encoder_decoder`` and ``max_prompt_tokens``.
    """

    backend: str = ""
    model: str = ""
    tokenizer: Any = None
    eos_ids: tuple[int, ...] = ()
    is_encoder_decoder: bool = False
    max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS

    # -- public API --------------------------------------------------------------------------

    def generate(self, instructions: Sequence[str], decodings: Sequence[DecodingSpec] = PAPER_DECODINGS, *,
                 keys: Sequence[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                 min_new_tokens: int = MIN_NEW_TOKENS,
                 seed: int = 0) -> list[list[Candidate]]:
        """Candidates for each instruction: for each decoding in order, its ``num_samples``
        candidates (``sample_idx`` from its ``first_sample``, 0..n-1 by default). ``keys`` (default:
        the instructions) seed sampling."""
        plan = self._plan(instructions, decodings, keys, max_new_tokens, min_new_tokens, seed)
        if plan is None:
            return []
        prompts, sampled_specs, seeds, beam_specs = plan
        sampled, beams = self._run_decodings(prompts, sampled_specs, seeds, beam_specs, max_new_tokens,
                                             min_new_tokens)
        return self._assemble(len(prompts), decodings, sampled_specs, sampled, beam_specs, beams)

    async def agenerate(self, instructions: Sequence[str], decodings: Sequence[DecodingSpec] = PAPER_DECODINGS, *,
                        keys: Sequence[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                        min_new_tokens: int = MIN_NEW_TOKENS, seed: int = 0) -> list[list[Candidate]]:
        """:meth:`generate` on an async engine (the vLLM backend with ``async_engine=True``): the
        same candidates, with every decoding in flight at once next to other callers' requests.
        Cancelling the call cancels (aborts) its engine requests."""
        plan = self._plan(instructions, decodings, keys, max_new_tokens, min_new_tokens, seed)
        if plan is None:
            return []
        prompts, sampled_specs, seeds, beam_specs = plan
        calls = [self._arun_samples(prompts, sampled_specs, seeds, max_new_tokens, min_new_tokens)] \
            if sampled_specs else []
        calls += [self._arun_beam(prompts, d, max_new_tokens, min_new_tokens) for d in beam_specs]
        results = await gather_or_cancel(calls)
        sampled = results.pop(0) if sampled_specs else []
        return self._assemble(len(prompts), decodings, sampled_specs, sampled, beam_specs, results)

    def _plan(self, instructions, decodings, keys, max_new_tokens, min_new_tokens, seed):
        """Checked inputs → ``(prompt ids, greedy/sampling specs, their seeds, beam specs)``, or
        None for no instructions."""
        instructions = _check_texts("instructions", instructions)
        keys = list(instructions) if keys is None else [str(k) for k in keys]
        if len(keys) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions but {len(keys)} keys")
        if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, "
                             f"got {min_new_tokens} and {max_new_tokens}")
        if not decodings or not all(isinstance(d, DecodingSpec) for d in decodings):
            raise ValueError("decodings must be a non-empty sequence of DecodingSpec")
        if not instructions:
            return None
        prompts = self.encode_prompts(instructions)
        sampled_specs = [d for d in decodings if d.kind != "beam"]
        seeds = [[candidate_seed(seed, k, d.name) + d.first_sample for k in keys] for d in sampled_specs]
        return prompts, sampled_specs, seeds, [d for d in decodings if d.kind == "beam"]

    def _assemble(self, n: int, decodings, sampled_specs, sampled, beam_specs, beams) -> list[list[Candidate]]:
        """Candidate records per instruction, in decoding order, from the backend's results."""
        by_spec = dict(zip([d.name for d in sampled_specs], sampled))
        by_spec.update((d.name, [[r] for r in best]) for d, best in zip(beam_specs, beams))
        out: list[list[Candidate]] = []
        for i in range(n):
            cands = []
            for d in decodings:
                results = by_spec[d.name][i]
                if len(results) != d.num_samples:
                    raise RuntimeError(f"{self.backend} returned {len(results)} candidates for {d.name}, "
                                       f"expected {d.num_samples}")
                cands += [self._candidate(d.name, d.first_sample + j, ids, lp) for j, (ids, lp) in enumerate(results)]
            out.append(cands)
        return out

    def loglik(self, instructions: Sequence[str], responses: Sequence[str], *,
               add_eos: bool = True) -> list[tuple[int, float]]:
        """``(num_tokens, logprob_sum)`` of each response given its instruction, tokenised as a
        continuation (plus the end-of-sequence token when ``add_eos``), with the same raw
        log-probabilities as candidates get."""
        return [(len(t), math.fsum(lp for _, lp in t))
                for t in self.token_logprobs(instructions, responses, add_eos=add_eos)]

    def token_logprobs(self, instructions: Sequence[str], responses: Sequence[str], *,
                       add_eos: bool | Sequence[bool] = True) -> list[list[tuple[int, float]]]:
        """Per response, ``(token id, raw log-probability)`` of each of its tokens given the
        instruction (see :meth:`loglik`; ``add_eos`` may be given per response): what an OpenAI
        ``logprobs`` answer reports."""
        prompts, conts = self._continuations(instructions, responses, add_eos)
        if not prompts:
            return []
        return [list(zip(c, lps)) for c, lps in zip(conts, self._token_logprobs_ids(prompts, conts))]

    async def atoken_logprobs(self, instructions: Sequence[str], responses: Sequence[str], *,
                              add_eos: bool | Sequence[bool] = True) -> list[list[tuple[int, float]]]:
        """:meth:`token_logprobs` on an async engine."""
        prompts, conts = self._continuations(instructions, responses, add_eos)
        if not prompts:
            return []
        return [list(zip(c, lps)) for c, lps in zip(conts, await self._atoken_logprobs_ids(prompts, conts))]

    def ids_logprobs(self, instructions: Sequence[str], continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """Raw log-probability of each given token id after its instruction (e.g. a candidate's
        ``token_ids``: the values its ``logprob_sum`` adds up)."""
        return self._token_logprobs_ids(self.encode_prompts(_check_texts("instructions", instructions)),
                                        [list(c) for c in continuations])

    async def aids_logprobs(self, instructions: Sequence[str],
                            continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """:meth:`ids_logprobs` on an async engine."""
        return await self._atoken_logprobs_ids(self.encode_prompts(_check_texts("instructions", instructions)),
                                               [list(c) for c in continuations])

    def _continuations(self, instructions, responses, add_eos) -> tuple[list[list[int]], list[list[int]]]:
        """Checked inputs of :meth:`token_logprobs` → (prompt ids, continuation ids)."""
        instructions = _check_texts("instructions", instructions)
        responses = _check_texts("responses", responses)
        if len(instructions) != len(responses):
            raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses")
        if not instructions:
            return [], []
        prompts = self.encode_prompts(instructions)
        conts = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        eos = [add_eos] * len(conts) if isinstance(add_eos, bool) else list(add_eos)
        if len(eos) != len(conts):
            raise ValueError(f"{len(conts)} responses but {len(eos)} add_eos flags")
        conts = [list(c) + ([self.eos_ids[0]] if e else []) for c, e in zip(conts, eos)]
        if any(len(c) == 0 for c in conts):
            raise ValueError("cannot score an empty response without add_eos")
        return prompts, conts

    def encode_prompts(self, instructions: Sequence[str]) -> list[list[int]]:
        """Prompt token ids (with the tokenizer's special tokens), keeping the last
        ``max_prompt_tokens`` tokens."""
        texts = list(instructions) if self.is_encoder_decoder else [prompt_text(t) for t in instructions]
        tok = self.tokenizer
        side = tok.truncation_side
        tok.truncation_side = "left"
        try:
            ids = tok(texts, truncation=True, max_length=self.max_prompt_tokens)["input_ids"]
        finally:
            tok.truncation_side = side
        return [list(x) for x in ids]

    def close(self) -> None:
        """Free the model (and, for vLLM, its engine processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- backend hooks -----------------------------------------------------------------------

    def _run_decodings(self, prompts: list[list[int]], sampled_specs: list[DecodingSpec], seeds: list[list[int]],
                       beam_specs: list[DecodingSpec], max_new_tokens: int, min_new_tokens: int):
        """(:meth:`_run_samples`'s result, one :meth:`_run_beam` result per beam decoding): the
        sampled decodings, then each beam search. A backend that can decode them together overrides it."""
        sampled = self._run_samples(prompts, sampled_specs, seeds, max_new_tokens, min_new_tokens) \
            if sampled_specs else []
        return sampled, [self._run_beam(prompts, d, max_new_tokens, min_new_tokens) for d in beam_specs]

    @abstractmethod
    def _run_samples(self, prompts: list[list[int]], specs: list[DecodingSpec], seeds: list[list[int]],
                     max_new_tokens: int, min_new_tokens: int) -> list[list[list[tuple[list[int], float]]]]:
        """For each spec (greedy or sample), for each prompt, ``num_samples`` pairs of
        (generated ids incl. a final end-of-sequence id, raw logprob sum). ``seeds[s][i]`` is the
        seed of sample 0 of spec s for prompt i."""

    @abstractmethod
    def _run_beam(self, prompts: list[list[int]], spec: DecodingSpec, max_new_tokens: int,
                  min_new_tokens: int) -> list[tuple[list[int], float]]:
        """The best beam per prompt: (generated ids, raw logprob sum)."""

    @abstractmethod
    def _token_logprobs_ids(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Raw log-probability of each token of each continuation after its prompt."""

    def _loglik_ids(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Raw log-probability sum of each continuation after its prompt."""
        return [math.fsum(lps) for lps in self._token_logprobs_ids(prompts, continuations)]

    async def _atoken_logprobs_ids(self, prompts: list[list[int]],
                                   continuations: list[list[int]]) -> list[list[float]]:
        """:meth:`_token_logprobs_ids` on an async engine (backends that have one)."""
        raise NotImplementedError(f"the {self.backend} backend has no async engine: use token_logprobs")

    async def _arun_samples(self, prompts: list[list[int]], specs: list[DecodingSpec], seeds: list[list[int]],
                            max_new_tokens: int, min_new_tokens: int) -> list[list[list[tuple[list[int], float]]]]:
        """:meth:`_run_samples` on an async engine (backends that have one)."""
        raise NotImplementedError(f"the {self.backend} backend has no async engine: use generate")

    async def _arun_beam(self, prompts: list[list[int]], spec: DecodingSpec, max_new_tokens: int,
                         min_new_tokens: int) -> list[tuple[list[int], float]]:
        """:meth:`_run_beam` on an async engine (backends that have one)."""
        raise NotImplementedError(f"the {self.backend} backend has no async engine: use generate")

    # -- helpers -----------------------------------------------------------------------------

    def _candidate(self, decoding: str, sample_idx: int, ids: Sequence[int], logprob_sum: float) -> Candidate:
        ids = list(ids)
        body = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        n = len(ids)
        return Candidate(text=text, decoding=decoding, sample_idx=sample_idx, num_tokens=n,
                         logprob_sum=float(logprob_sum), logprob_mean=float(logprob_sum) / n if n else 0.0,
                         token_ids=tuple(ids))


async def gather_or_cancel(coros: Sequence[Awaitable]) -> list:
    """``asyncio.gather`` of ``coros`` that leaves nothing running behind it: when one fails or the
    caller is cancelled, the others are cancelled and awaited (an async engine aborts their
    requests) before the error propagates."""
    import asyncio

    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single str")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name}[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")
    return texts


def eos_token_ids(tokenizer, model_path: str | None = None, config: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's, then any extra ones the model's config or
    generation config declares (e.g. Llama 3's ``<|eot_id|>``)."""
    ids: list[int] = []

    def add(v):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int) and x not in ids:
                ids.append(x)

    add(tokenizer.eos_token_id)
    if config is not None:
        add(getattr(config, "eos_token_id", None))
    if model_path is not None:
        try:
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(model_path).eos_token_id)
        except (OSError, ValueError):
            pass  # no generation_config.json: the tokenizer's EOS is the only one
    if not ids:
        raise ValueError(f"{model_path or 'the model'} has no end-of-sequence token")
    return tuple(ids)
