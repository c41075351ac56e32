"""The transformers generation backend: ``generate()`` for causal and seq2seq models.

Greedy and sampling decodings run ``model.generate`` with one logits processor,
:class:`~cappy_core.generation.token_choice.SeededChooser`, that picks each next token itself by
the per-row rule of :mod:`~cappy_core.generation.token_choice` (end-of-sequence masked until
``min_new_tokens``, temperature → top-k → top-p, a draw at a uniform of the candidate's seed and the
step only, the raw log-probability recorded) and hands ``generate`` a one-hot distribution. The
model's ``generation_config`` is replaced by a bare one at load time, so no other processor runs
before it and the scores it sees are the raw logits. Beam search is ``generate(num_beams=...)``;
its candidates are rescored with :meth:`TransformersGenerator._loglik_ids` (a teacher-forced
forward pass).

Decoder-only models decode with a loop of their own instead of ``generate``. Sampling and
greedy: every sampled row of every sampling decoding of a chunk of prompts decodes in one batch;
each prompt is prefilled **once** (17 candidates share one prompt, which is most of the tokens); a
row that has ended leaves the batch (``generate`` keeps computing it until the longest row ends,
and samples of 64 tokens are common). The per-row rule is :class:`SeededChooser`'s, token for
token (:func:`~cappy_core.generation.token_choice.choose_tokens`). Beam search: transformers' algorithm
step by step (:func:`~cappy_core.generation.beam_search_step`, which the vLLM backend runs too)
over the same cache, one prefill per prompt instead of one per beam; the reported log-likelihood
is the beam's raw sum. With the shared prompt cache the beams decode **in the same batch** as the
sampled rows (after them; they reorder every step, the sampled rows stay put), so a prompt is
prefilled once for all its candidates and each step is one forward pass; with the repeated cache,
samples and beams are two passes as before (the benchmark's old path).

``decode_loop`` (:data:`~cappy_core.generation.DECODE_LOOPS`) says how the prompt's keys and values are kept:

- ``"shared"`` (the default where the model allows it, else ``"cached"``): once per prompt, in a
  :class:`~cappy_core.generation.kv_cache.SharedPrefixCache`; each step attends every row to
  its prompt's part and its own generated part (that module says how);
- ``"cached"``: repeated for every row of the prompt, in one preallocated cache;
- ``"generate"``: ``model.generate`` per sampling decoding (seq2seq models always use it).

The three give the same candidates up to floating-point rounding (the tests compare them); the
benchmark (``python -m jobs.bench.sampling``) times them side by side.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
)

from cappy_core.generation.base import DEFAULT_PROMPT_TOKENS, Generator, check_backend_settings, eos_token_ids
from cappy_core.generation.beam_search import beam_search_step, beam_width
from cappy_core.generation.kv_cache import (
    SharedPrefixCache,
    preallocated_cache,
    supports_shared_prefix,
    use_shared_prefix_attention,
)
from cappy_core.generation.token_choice import SeededChooser, choose_tokens, spec_warpers

__all__ = ["TransformersGenerator", "SeededChooser"]

#: Prompts per prefill forward pass of the shared-prefix loop (sorted by length, so each pass pads little).
PREFILL_GROUP = 8


class TransformersGenerator(Generator):
    """:class:`~cappy_core.generation.Generator` on transformers (causal or seq2seq LM).

    ``batch_rows`` bounds the rows (prompt × sample, or prompt × beam) of one ``generate`` call;
    ``max_logits_elements`` bounds the logits tensor of one rescoring forward pass.
    """

    backend = "hf"

    def __init__(self, model: str, *, max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS, dtype: str = "auto",
                 device: str | None = None, batch_rows: int = 64, max_logits_elements: int = 1 << 27,
                 trust_remote_code: bool = False, decode_loop: str = "shared", use_safetensors: bool = True):
        check_backend_settings(max_prompt_tokens, decode_loop)
        self.model = str(model)
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_rows = max(1, batch_rows)
        self.max_logits_elements = max_logits_elements
        config = AutoConfig.from_pretrained(self.model, trust_remote_code=trust_remote_code)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.decode_loop = "generate" if self.is_encoder_decoder else decode_loop
        cls = AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        lm = cls.from_pretrained(self.model, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                 use_safetensors=use_safetensors)
        self.lm = lm.to(self.device).eval()
        if self.decode_loop == "shared":
            if supports_shared_prefix(self.lm):
                use_shared_prefix_attention(self.lm)
            else:
                self.decode_loop = "cached"
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

    def _run_decodings(self, prompts, sampled_specs, seeds, beam_specs, max_new_tokens, min_new_tokens):
        if self.decode_loop == "shared":  # sampled rows and beams in one batch, one prefill per prompt
            return self._decode(prompts, sampled_specs, seeds, beam_specs, max_new_tokens, min_new_tokens)
        return super()._run_decodings(prompts, sampled_specs, seeds, beam_specs, max_new_tokens, min_new_tokens)

    def _run_samples(self, prompts, specs, seeds, max_new_tokens, min_new_tokens):
        if self.decode_loop != "generate":
            return self._decode(prompts, specs, seeds, [], max_new_tokens, min_new_tokens)[0]
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
                                        self.eos_ids)
                gen, _ = self._generate(batch, logits_processor=LogitsProcessorList([chooser]), do_sample=False,
                                        num_beams=1, max_new_tokens=max_new_tokens)
                steps = torch.stack(chooser.logprobs, dim=1).double().cpu()  # rows × steps
                for r, (i, _) in enumerate(chunk):
                    toks = self._cut(gen[r].tolist())
                    per_prompt[i].append((toks, float(steps[r, :len(toks)].sum())))
            results.append(per_prompt)
        return results

    def _prefill(self, prompts, max_new_tokens: int, row_prompt: torch.Tensor):
        """Run the prompts once into a cache with room for ``max_new_tokens`` more, for the batch
        rows ``row_prompt`` (row ``r`` continues prompt ``row_prompt[r]``); returns (cache, last
        logits, attention mask, next position ids), one row each. With the shared-prefix loop the
        cache holds each prompt once (:class:`SharedPrefixCache`) and the mask is None: the decode
        steps attend through the cache, not a mask. Call under inference_mode."""
        row_prompt = row_prompt.to(self.device)
        if self.decode_loop == "shared":
            cache, logits, next_pos = self._prefill_shared(prompts, max_new_tokens, row_prompt)
            return cache, logits[row_prompt], None, next_pos[row_prompt]
        ids, mask = self._pad(prompts, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = preallocated_cache(ids.shape[1] + max_new_tokens)
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.batch_select_indices(row_prompt)  # each row its own copy of its prompt's cache
        return cache, logits[row_prompt], mask[row_prompt], pos[row_prompt, -1] + 1

    def _prefill_shared(self, prompts, max_new_tokens: int, row_prompt: torch.Tensor):
        """The prompts' keys and values in a :class:`SharedPrefixCache`, left-padded to the longest
        prompt, and each prompt's last logits and next position. The forward passes take
        :data:`PREFILL_GROUP` prompts of similar length at a time: padding every prompt of a chunk to
        its longest computed ~3× the prompt tokens on the local sweep's tasks (12–142 tokens, mean 49)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        longest = len(prompts[order[-1]])
        prompt_mask = torch.zeros((len(prompts), longest), dtype=torch.bool, device=self.device)
        next_pos = torch.tensor([len(p) for p in prompts], device=self.device)
        kv, logits = None, None
        for g in range(0, len(order), PREFILL_GROUP):
            group = order[g:g + PREFILL_GROUP]
            ids, mask = self._pad([prompts[i] for i in group], left=True)
            part = DynamicCache()
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          past_key_values=part, use_cache=True, logits_to_keep=1).logits[:, -1]
            if kv is None:  # zeros where a prompt is padded: its bias hides them from attention
                padded = lambda x: x.new_zeros((len(prompts), x.shape[1], longest, x.shape[-1]))
                kv = [(padded(layer.keys), padded(layer.values)) for layer in part.layers]
                logits = out.new_empty((len(prompts), out.shape[-1]))
            rows, start = torch.tensor(group, device=self.device), longest - ids.shape[1]
            for (k, v), layer in zip(kv, part.layers):
                k[rows, :, start:], v[rows, :, start:] = layer.keys, layer.values
            prompt_mask[rows, start:] = mask.bool()
            logits[rows] = out
        return SharedPrefixCache(max_new_tokens, kv, prompt_mask, row_prompt), logits, next_pos

    def _select(self, cache, mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """Keep (and order) the batch rows ``rows`` of the cache and of the mask (None: no mask)."""
        rows = rows.to(self.device)
        cache.batch_select_indices(rows)
        return None if mask is None else mask[rows]

    @staticmethod
    def _grow(mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask extended by the position the next step writes (None: no mask)."""
        return None if mask is None else torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)

    def _step(self, tokens: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decode step: each row's next token in, its next-token logits out."""
        extra = {"shared_prefix": cache} if isinstance(cache, SharedPrefixCache) else {}
        return self.lm(input_ids=tokens[:, None].to(self.device), attention_mask=mask, position_ids=positions[:, None],
                       past_key_values=cache, use_cache=True, **extra).logits[:, -1]

    def _decode(self, prompts, specs, seeds, beam_specs, max_new_tokens, min_new_tokens):
        """The KV-cached decode loop (decoder-only models) over chunks of prompts: the sampled
        decodings ``specs`` and the beam searches ``beam_specs`` of a chunk in one batch; returns
        (:meth:`_run_samples`'s result, one :meth:`_run_beam` result per beam decoding)."""
        per_prompt = sum(spec.num_samples for spec in specs) + sum(spec.num_beams for spec in beam_specs)
        sampled = [[[] for _ in prompts] for _ in specs]
        beams: list[list[tuple[list[int], float]]] = [[] for _ in beam_specs]
        step = max(1, self.batch_rows // per_prompt)
        for c in range(0, len(prompts), step):
            chunk = range(c, min(c + step, len(prompts)))
            # sampled rows: decoding-major, then prompt, then sample; a decoding's rows stay one
            # contiguous slice of the batch (rows leave in order), so its tokens are chosen on a view
            rows = [(i, s, j) for s, spec in enumerate(specs) for i in chunk for j in range(spec.num_samples)]
            row_seeds = [0 if specs[s].kind == "greedy" else int(seeds[s][i] + j) for i, s, j in rows]
            out, found = self._decode_chunk([prompts[i] for i in chunk], [i - c for i, _, _ in rows],
                                            [s for _, s, _ in rows], row_seeds, specs, beam_specs,
                                            max_new_tokens, min_new_tokens)
            for (i, s, _), res in zip(rows, out):
                sampled[s][i].append(res)
            for b, best in enumerate(found):
                beams[b] += best
        return sampled, beams

    def _decode_chunk(self, chunk_prompts, row_prompts, row_specs, row_seeds, specs, beam_specs,
                      max_new_tokens, min_new_tokens):
        """One chunk: the sampled rows (``row_prompts[r]`` / ``row_specs[r]`` / ``row_seeds[r]``,
        decoding-major) first in the batch, then each beam decoding's beams (``num_beams`` rows per
        prompt, prompt-major). Returns ((token ids, raw log-prob sum) per sampled row, the best beam
        per prompt for each beam decoding)."""
        dev, num_prompts = self.device, len(chunk_prompts)
        warpers = [spec_warpers(spec) for spec in specs]
        spec_of = torch.tensor(row_specs, dtype=torch.long)  # sorted: rows are decoding-major
        row_seeds = torch.tensor(row_seeds, dtype=torch.int64)
        eos_t = torch.tensor(list(self.eos_ids), dtype=torch.long, device=dev)
        eos_cpu = eos_t.cpu()
        shared = self.decode_loop == "shared"
        # beam search state per beam decoding (transformers' algorithm, beam_search_step): running
        # beams (ids, log-prob sum, batch row), finished hypotheses, prompts still searching
        running_b, finished_b, searching_b, beam_prompts = [], [], [], []
        for spec in beam_specs:
            first = len(row_prompts) + len(beam_prompts)  # row of the prompt's first beam
            running_b.append([[([], 0.0, first + p * spec.num_beams)] for p in range(num_prompts)])
            finished_b.append([[] for _ in range(num_prompts)])
            searching_b.append(list(range(num_prompts)))
            beam_prompts += [p for p in range(num_prompts) for _ in range(spec.num_beams)]
        with torch.inference_mode():
            cache, logits, mask, next_pos = self._prefill(chunk_prompts, max_new_tokens,
                                                          torch.tensor(row_prompts + beam_prompts))
            active = torch.arange(len(row_prompts))  # original row of each sampled batch row
            running = torch.ones(len(row_prompts), dtype=torch.bool)  # not ended (ended rows wait to leave)
            history = torch.full((len(row_prompts), max_new_tokens), -1, dtype=torch.long)  # -1: after the end
            logprob_sum = torch.zeros(len(row_prompts), dtype=torch.float64)
            for t in range(max_new_tokens):
                last = t + 1 == max_new_tokens
                # sampled rows: each decoding's rule (choose_tokens) on its slice of the batch
                n_s = len(active)
                tokens = torch.empty(n_s, dtype=torch.long)
                lps = torch.empty(n_s, dtype=torch.float64)
                bounds = torch.searchsorted(spec_of[active], torch.arange(len(specs) + 1)).tolist()
                for s, spec in enumerate(specs):
                    a, b = bounds[s], bounds[s + 1]
                    if a < b:
                        tok, lp = choose_tokens(logits[a:b], spec.kind == "greedy", warpers[s],
                                                row_seeds[active[a:b]], t, eos_t if t < min_new_tokens else None)
                        tokens[a:b], lps[a:b] = tok.cpu(), lp.double().cpu()
                live = active[running]
                history[live, t] = tokens[running]
                logprob_sum[live] += lps[running]
                running &= ~torch.isin(tokens, eos_cpu)
                keep = running.nonzero()[:, 0]
                # Ended rows leave the batch once they are a tenth of it (a quarter with the prompt
                # repeated per row): leaving copies the rows' cache, the whole of it unless the prompt
                # is shared (measured on the local sweep's generator: leaving at once is no faster).
                if last or not len(keep):
                    keep = keep[:0]
                elif len(keep) > (0.9 if shared else 0.75) * n_s:
                    keep = None  # all stay
                n_next = n_s if keep is None else len(keep)
                # beam rows: one step of each beam search; each running beam takes the next batch row
                src, beam_tokens = [], []
                for b, spec in enumerate(beam_specs):
                    if searching_b[b]:
                        searching_b[b] = self._beam_step(logits, t, spec, running_b[b], finished_b[b], searching_b[b],
                                                         min_new_tokens, last)
                        for i in searching_b[b]:
                            for q, (ids, s, r) in enumerate(running_b[b][i]):
                                running_b[b][i][q] = (ids, s, n_next + len(src))
                                src.append(r)
                                beam_tokens.append(ids[-1])
                if not n_next and not src:
                    break
                if keep is not None or beam_specs:  # the batch changes: the sampled rows kept, then the beams
                    rows = torch.cat([torch.arange(n_s) if keep is None else keep,
                                      torch.tensor(src, dtype=torch.long)])
                    mask = self._select(cache, mask, rows)
                    next_pos = next_pos[rows.to(dev)]
                    if keep is not None:
                        tokens, active, running = tokens[keep], active[keep], running[keep]
                    tokens = torch.cat([tokens, torch.tensor(beam_tokens, dtype=torch.long)])
                mask = self._grow(mask)
                logits = self._step(tokens, mask, next_pos, cache)
                next_pos = next_pos + 1
        out = [([x for x in h if x >= 0], lp) for h, lp in zip(history.tolist(), logprob_sum.tolist())]
        return out, [[(f[0][1], f[0][2]) for f in finished] for finished in finished_b]

    def _beam_step(self, logits, t, spec, running, finished, searching, min_new_tokens, last) -> list[int]:
        """One step of transformers' beam search (:func:`beam_search_step`) for the prompts
        ``searching``, each running beam ``(ids, log-prob sum, batch row)`` extended by its row's
        best tokens; returns the prompts still searching (``running`` then holds their beams, with
        the rows they extend)."""
        eos = set(self.eos_ids)
        rows = [r for i in searching for _, _, r in running[i]]
        logp = torch.log_softmax(logits[torch.tensor(rows, device=self.device)].float(), dim=-1)
        if t < min_new_tokens:
            logp[:, list(self.eos_ids)] = -float("inf")
        top_lp, top_tok = logp.topk(min(beam_width(spec.num_beams, len(eos)), logp.shape[-1]), dim=-1)
        top_lp, top_tok = top_lp.double().cpu().tolist(), top_tok.cpu().tolist()
        at = {r: n for n, r in enumerate(rows)}
        cands = {i: [(s + lp, ids + [tok], r) for ids, s, r in running[i]
                     for lp, tok in zip(top_lp[at[r]], top_tok[at[r]]) if lp > -float("inf")]
                 for i in searching}
        return beam_search_step(t, cands, running, finished, spec.num_beams, eos, spec.length_penalty, last=last)

    def _run_beam(self, prompts, spec, max_new_tokens, min_new_tokens):
        if self.decode_loop != "generate":
            return self._decode(prompts, [], [], [spec], max_new_tokens, min_new_tokens)[1][0]
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

    def _token_logprobs_ids(self, prompts, continuations):
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        order = list(range(len(prompts)))
        result: list[list[float]] = [[] for _ in prompts]
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

    def _loglik_rows(self, prompts, conts) -> list[list[float]]:
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
                out.append(lp.gather(1, tgt[:, None]).double().squeeze(1).tolist())
        return out

    def close(self) -> None:
        self.lm = None
