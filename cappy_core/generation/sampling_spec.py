"""How candidates are drawn, as one value: :class:`SamplingSpec`.

``cappy sample`` and ``cappy sweep`` embed the same one (a config section: ``--sampling.seed``, a
``sampling:`` YAML mapping), so the sweep hands its own to the sampler whole instead of copying
fields. Its fields marked ``"key"`` define the candidates (a resumed output must match them);
the others only spread the work (batches, actors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cappy_core.config import SettingError
from cappy_core.generation.decoding import (MAX_NEW_TOKENS, MIN_NEW_TOKENS, PAPER_DECODING_NAMES, PAPER_NUM_SAMPLES,
                                            decodings_from_names)
from cappy_core.generation.prompts import PROMPT_FORMATS


def _key(default, help: str, **meta):
    return field(default=default, metadata={"key": True, "help": help, **meta})


@dataclass(frozen=True)
class SamplingSpec:
    """The decodings, candidates per decoding, tokens and seed (what defines the candidates), and
    the batches and generator actors that sample them."""

    decodings: list[str] = field(default_factory=lambda: list(PAPER_DECODING_NAMES), metadata={
        "key": True, "help": "decodings: greedy, beam<N>, sample, temp<T>, topk<K>, topp<P>; the paper's: beam4 + "
                             "4 samples each of sample, temp0.9, topk40, topp0.95 = 17 candidates"})
    samples_per_decoding: int = _key(PAPER_NUM_SAMPLES, "candidates per sampling decoding")
    max_new_tokens: int = _key(MAX_NEW_TOKENS, "most generated tokens per candidate")
    min_new_tokens: int = _key(MIN_NEW_TOKENS, "fewest tokens before end-of-sequence")
    seed: int = _key(0, "sampling seed (per instruction, decoding and sample)")
    prompt_format: str = _key("plain", "what the generator reads: plain, the instruction as it is (the paper's), or chat, "
                              "the instruction as one user message through its chat template (an instruct model "
                              "such as smollm2); candidates are the answer alone either way", choices=PROMPT_FORMATS)
    batch_size: int = field(default=32, metadata={"help": "instructions per generator call"})
    batch_rows: int = field(default=64, metadata={
        "help": "backend hf: candidate rows decoded in one batch (a call's batch_size x 17 decodes at once: fewer "
                "steps of per-step overhead, more memory)"})
    num_actors: int = field(default=1, metadata={"help": "generator actors (one model each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generator actor (0 on CPU)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per generator actor"})

    def __post_init__(self) -> None:
        for name in ("samples_per_decoding", "max_new_tokens", "batch_size", "batch_rows", "num_actors"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SettingError("min_new_tokens", f"must be in [0, max_new_tokens], got {self.min_new_tokens}",
                               related=["max_new_tokens"])
        if self.prompt_format not in PROMPT_FORMATS:
            raise SettingError("prompt_format", f"{self.prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise SettingError("cpus_per_actor", f"must be > 0 (and gpus_per_actor >= 0), got {self.cpus_per_actor}",
                               related=["gpus_per_actor"])
        try:
            decodings_from_names(self.decodings, self.samples_per_decoding)
        except ValueError as e:
            raise SettingError("decodings", f"{list(self.decodings)}: {e}") from None
