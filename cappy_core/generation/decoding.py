"""What a decoding is: the decoding names (``greedy``, ``beam<N>``, ``sample``, ``temp<T>``,
``topk<K>``, ``topp<P>``), the paper's 17-candidate plan, how a request's ``num_candidates`` spreads
over it, and the seed each sample draws with. Backend-free: the CLI, serve's request checks and both
backends read the same rules.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

#: The paper's generation settings: at least 3 and at most 64 new tokens per candidate, 4 candidates
#: per sampling decoding (its prompts keep their last 512 tokens: ``base.DEFAULT_PROMPT_TOKENS``).
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
    #: The index of this spec's first sample: samples ``first_sample .. first_sample+num_samples-1``
    #: of the decoding, each the same candidate as in a call that asks for all of them (its seed is
    #: its index's), so a caller can generate a decoding's samples a few at a time.
    first_sample: int = 0

    def __post_init__(self):
        if self.kind not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding {self.name!r}: kind must be greedy, beam or sample, got {self.kind!r}")
        if self.num_samples < 1:
            raise ValueError(f"decoding {self.name!r}: num_samples must be >= 1")
        if self.first_sample < 0 or (self.kind != "sample" and self.first_sample):
            raise ValueError(f"decoding {self.name!r}: first_sample must be >= 0, and 0 unless it samples")
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


def candidates_per_instruction(decodings: Sequence[DecodingSpec]) -> int:
    return sum(d.num_samples for d in decodings)


def candidate_seed(seed: int, key: str, decoding: str) -> int:
    """Seed of sample 0 of ``decoding`` for the instruction keyed ``key`` (sample j: + j)."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{decoding}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2  # < 2**62: room for + j in a signed 64-bit seed
