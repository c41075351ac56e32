"""The transformers generation backend: ``generate()`` for causal and seq2seq models.

Greedy and sampling decodings run ``model.generate`` with one logits processor,
:class:`SeededChooser`, that picks each next token itself: it masks end-of-sequence until
``min_new_tokens`` tokens exist, applies temperature → top-k → top-p (transformers' own warpers),
draws from a ``torch.Generator`` per row seeded with that candidate's seed (so a sample does not
depend on what else is in the batch), records the raw log-probability of the chosen token, and
hands ``generate`` a one-hot distribution. The model's ``generation_config`` is replaced by a
bare one at load time, so no other processor runs before it and the scores it sees are the raw
logits. Beam search is ``generate(num_beams=...)``; its candidates are rescored with
:meth:`TransformersGenerator._loglik_ids` (a teacher-forced forward pass).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cappy_core.generation import DEFAULT_PROMPT_TOKENS, DecodingSpec, Generator, eos_token_ids

__all__ = ["TransformersGenerator", "SeededChooser"]


class SeededChooser(LogitsProcessor):
    """Chooses the next token of every row (greedy or seeded sampling); see the module docstring."""

    def __init__(self, spec: DecodingSpec, seeds: Sequence[int] | None, start_len: int, min_new_tokens: int,
                 eos_ids: Sequence[int], device: torch.device | str = "cpu"):
        self.greedy = spec.kind == "greedy"
        self.start_len = start_len
        self.min_new_tokens = min_new_tokens
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.gens = None if self.greedy else [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.warpers = []
        if not self.greedy:
            if spec.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(spec.temperature))
            if spec.top_k > 0:
                self.warpers.append(TopKLogitsWarper(top_k=spec.top_k))
            if spec.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=spec.top_p))
        self.logprobs: list[torch.Tensor] = []  # per step: raw log-prob of each row's token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        raw = torch.log_softmax(scores, dim=-1)
        x = scores.clone()
        if input_ids.shape[1] - self.start_len < self.min_new_tokens:
            x[:, self.eos.to(x.device)] = -float("inf")
        if self.greedy:
            tokens = x.argmax(dim=-1)
        else:
            for w in self.warpers:
                x = w(input_ids, x)
            probs = torch.softmax(x, dim=-1)
            tokens = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(self.gens)])
        self.logprobs.append(raw.gather(1, tokens[:, None])[:, 0])
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out


class TransformersGenerator(Generator):
    """:class:`~cappy_core.generation.Generator` on transformers (causal or seq2seq LM).

    ``batch_rows`` bounds the rows (prompt × sample, or prompt × beam) of one ``generate`` call;
    ``max_logits_elements`` bounds the logits tensor of one rescoring forward pass.
    """

    backend = "hf"

    def __init__(self, model: str, *, max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS, dtype: str = "auto",
                 device: str | None = None, batch_rows: int = 64, max_logits_elements: int = 1 << 27, trust_remote_code: bool = False):
        if max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be >= 2, got {max_prompt_tokens}")
        self.model = str(model)
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_rows = max(1, batch_rows)
        self.max_logits_elements = max_logits_elements
        config = AutoConfig.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        lm = cls.from_pretrained(self.model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        self.lm = lm.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model, config)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        start = getattr(lm.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "decoder_start_token_id", None)
        if self.is_encoder_decoder and start is None:
            start = self.pad_id
        self.decoder_start_id = start
        # A bare generation config: decoding is defined by DecodingSpec alone (no penalties etc.).
        self.lm.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id,
            decoder_start_token_id=start)

    # -- batching helpers ---------------------------------------------------------------------

    def _pad(self, seqs: Sequence[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for r, s in enumerate(seqs):
            if left:
                ids[r, n - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[r, n - len(s):] = 1
            else:
                ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[r, :len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate(self, prompts: list[list[int]], **kwargs) -> tuple[torch.Tensor, int]:
        """Run generate on prompts; returns (generated part of the sequences, start_len)."""
        ids, mask = self._pad(prompts, left=not self.is_encoder_decoder)
        with torch.inference_mode():
            out = self.lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        start = 1 if self.is_encoder_decoder else ids.shape[1]  # seq2seq output starts with decoder start
        return out[:, start:].cpu(), ids.shape[1]

    def _cut(self, row: Sequence[int]) -> list[int]:
        """Generated ids up to and including the first end-of-sequence id."""
        row = list(row)
        for t, x in enumerate(row):
            if x in self.eos_ids:
                return row[:t + 1]
        return row

    # -- backend hooks ------------------------------------------------------------------------

    def _run_samples(self, prompts, specs, seeds, max_new_tokens, min_new_tokens):
        results = []
        for spec, spec_seeds in zip(specs, seeds):
            n = spec.num_samples
            rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
            per_prompt: list[list[tuple[list[int], float]]] = [[] for _ in prompts]
            for c in range(0, len(rows), self.batch_rows):
                chunk = rows[c:c + self.batch_rows]
                batch = [prompts[i] for i, _ in chunk]
                start_len = 1 if self.is_encoder_decoder else max(len(p) for p in batch)
                chooser = SeededChooser(spec, [spec_seeds[i] + j for i, j in chunk], start_len, min_new_tokens,
                                        self.eos_ids, device=self.device)
                gen, _ = self._generate(batch, logits_processor=LogitsProcessorList([chooser]), do_sample=False,
                                        num_beams=1, max_new_tokens=max_new_tokens)
                steps = torch.stack(chooser.logprobs, dim=1).double().cpu()  # rows × steps
                for r, (i, _) in enumerate(chunk):
                    toks = self._cut(gen[r].tolist())
                    per_prompt[i].append((toks, float(steps[r, :len(toks)].sum())))
            results.append(per_prompt)
        return results

    def _run_beam(self, prompts, spec, max_new_tokens, min_new_tokens):
        per_call = max(1, self.batch_rows // spec.num_beams)
        outs: list[list[int]] = []
        for c in range(0, len(prompts), per_call):
            gen, _ = self._generate(prompts[c:c + per_call], num_beams=spec.num_beams, do_sample=False,
                                    max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    length_penalty=spec.length_penalty, early_stopping=False,
                                    num_return_sequences=1)
            outs += [self._cut(row) for row in gen.tolist()]
        nonempty = [k for k, o in enumerate(outs) if o]
        lps = self._loglik_ids([prompts[k] for k in nonempty], [outs[k] for k in nonempty])
        sums = [0.0] * len(outs)
        for k, lp in zip(nonempty, lps):
            sums[k] = lp
        return list(zip(outs, sums))

    def _loglik_ids(self, prompts, continuations):
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        order = list(range(len(prompts)))
        result = [0.0] * len(prompts)
        c = 0
        while c < len(order):
            # as many rows as fit the logits budget (at least one)
            rows = [order[c]]
            longest = len(prompts[order[c]]) + len(continuations[order[c]])
            while c + len(rows) < len(order):
                k = order[c + len(rows)]
                nxt = max(longest, len(prompts[k]) + len(continuations[k]))
                if (len(rows) + 1) * nxt * vocab > self.max_logits_elements:
                    break
                rows.append(k)
                longest = nxt
            c += len(rows)
            for k, lp in zip(rows, self._loglik_rows([prompts[k] for k in rows], [continuations[k] for k in rows])):
                result[k] = lp
        return result

    def _loglik_rows(self, prompts, conts) -> list[float]:
        with torch.inference_mode():
            if self.is_encoder_decoder:
                enc, enc_mask = self._pad(prompts, left=False)
                dec, dec_mask = self._pad([[self.decoder_start_id] + c[:-1] for c in conts], left=False)
                logits = self.lm(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
                                 decoder_attention_mask=dec_mask).logits
                offsets = [0] * len(conts)
            else:
                ids, mask = self._pad([p + c for p, c in zip(prompts, conts)], left=False)
                logits = self.lm(input_ids=ids, attention_mask=mask).logits
                offsets = [len(p) - 1 for p in prompts]
            out = []
            for r, (off, c) in enumerate(zip(offsets, conts)):
                lp = torch.log_softmax(logits[r, off:off + len(c)].float(), dim=-1)
                tgt = torch.tensor(c, dtype=torch.long, device=lp.device)
                out.append(float(lp.gather(1, tgt[:, None]).double().sum()))
        return out

    def close(self) -> None:
        self.lm = None
