"""``cappy sample``'s Ray Data actor stage: one generator per actor; one input row → one row per
candidate. Runs in the actor's process, so everything it needs it loads itself."""

from __future__ import annotations

import os
import time

import pyarrow as pa


def honour_cpu_reservation() -> None:
    """Run torch on as many threads as the actor reserved CPUs. Ray sets ``OMP_NUM_THREADS`` to the
    reservation (at least 1), but torch ignores it when the driver's environment preloads libgomp
    (``LD_PRELOAD``, which starting a vLLM engine sets in its process): a 1-CPU actor then ran on every
    core, competing with the other actors and making its measured rate that of more cores."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


class CandidateStage:
    """Ray Data actor stage: one generator per actor; one input row → one row per candidate."""

    def __init__(self, backend: str, generator: str, generator_kwargs: dict, decodings: tuple,
                 max_new_tokens: int, min_new_tokens: int, seed: int, prompt_format: str = "plain"):
        from cappy_core.generation import load_generator

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine start logs ~100 lines per actor
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if os.environ.get("TRANSFORMERS_VERBOSITY", "error") not in ("info", "debug"):  # --log-level debug shows them
            from cappy_core.scorer.model import quiet_transformers

            quiet_transformers()  # the weight-loading bar of every actor would print between the progress bars
        if backend == "hf":
            honour_cpu_reservation()
        self.gen = load_generator(backend, generator, **generator_kwargs)
        self.prompt_format = prompt_format
        self.decodings = decodings
        self.kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cappy_core.generation.prompts import format_instruction
        from cappy_core.labeling.candidates import expand_with_candidates

        started = time.time()
        prompts = [format_instruction(t, self.gen.tokenizer, self.prompt_format) for t in batch["instruction"].to_pylist()]
        cands = self.gen.generate(prompts, self.decodings,
                                  keys=batch["instruction_id"].to_pylist(), **self.kw)
        return expand_with_candidates(batch, cands, started)
