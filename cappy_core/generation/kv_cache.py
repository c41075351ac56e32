"""The KV caches of the transformers backend's decode loop, and the attention that reads the shared one.

:func:`preallocated_cache` (``decode_loop="cached"``) holds every row's whole sequence, the prompt
repeated for each of its rows, in buffers sized for the whole decode. :class:`SharedPrefixCache`
(``decode_loop="shared"``, the default) holds each prompt once.

Why: the 17 candidates of an instruction share its prompt, and prompts are most of each row's keys
and values (a ~50-token prompt, ~25 generated tokens; and a chunk's prompts are left-padded to its
longest). Repeating the prompt's cache for every row made each decode step read it 16 times,
copy it whenever rows leave the batch, and reorder it at every beam-search step.

:class:`SharedPrefixCache` keeps the prompt part once per prompt (``P`` rows, the prefill's keys
and values, left-padded) and only the generated part per candidate row (``R`` rows: sampled rows
and beams alike; picking rows rewrites in place only the rows that change). At each decode step
:func:`shared_prefix_attention` attends every row to both and merges the two softmaxes with their
log-sum-exp, which is exactly attention over the concatenated keys up to floating-point rounding:

    out = o_prompt · exp(lse_prompt − lse) + o_gen · exp(lse_gen − lse),   lse = log(exp(lse_prompt) + exp(lse_gen))

with ``o`` each part's softmax-weighted values and ``lse`` its log-sum-exp of scores. In the
prompt part each prompt's keys are attended by the queries of all of its rows at once (one query
block per prompt), so they are read once per step, not once per row. The prefill itself (and every forward pass without this
cache: teacher-forced log-likelihoods, ``generate``) is plain SDPA.

It applies to decoder-only models whose attention is transformers' attention interface with full
causal attention (:func:`supports_shared_prefix`); others keep the repeated cache.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


class _PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes into a buffer sized for the whole decode and hands out views.

    ``DynamicLayer`` concatenates the whole cache at every step (copying it); this layer copies only
    the new token's keys and values. ``keys`` / ``values`` stay views of the filled part, so the
    model's attention reads exactly what ``DynamicLayer`` would give it.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        rows, m = key_states.shape[0], key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = key_states.new_empty((rows, key_states.shape[1], self.capacity, key_states.shape[-1]))
            self._v = value_states.new_empty((rows, value_states.shape[1], self.capacity, value_states.shape[-1]))
            self._n = 0
        n = self._n
        if n + m > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full")
        # the first ``rows`` rows: a buffer may hold more rows than the batch (see _GeneratedPart)
        self._k[:rows, :, n:n + m] = key_states
        self._v[:rows, :, n:n + m] = value_states
        self._n = n + m
        self.keys, self.values = self._k[:rows, :, :self._n], self._v[:rows, :, :self._n]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]


def preallocated_cache(capacity: int) -> Cache:
    """A cache of :class:`_PreallocatedLayer` layers (one per model layer, created on first use)."""
    return Cache(layer_class_to_replicate=lambda: _PreallocatedLayer(capacity))


ATTN_IMPLEMENTATION = "cappy_shared_prefix"
# Model types whose attention is plain scaled dot-product attention through the interface (no
# soft-capping, ALiBi or per-layer scaling); sliding-window layers are ruled out from the config.
_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports_shared_prefix(model) -> bool:
    """Whether ``model`` can decode with :class:`SharedPrefixCache` (see the module docstring)."""
    config = model.config
    if config.model_type not in _MODEL_TYPES or not getattr(model, "_supports_attention_backend", False):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))


def use_shared_prefix_attention(model) -> None:
    """Route ``model``'s attention through :func:`shared_prefix_attention` (SDPA unless a forward
    pass is given a :class:`SharedPrefixCache` as ``shared_prefix``)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


class _GeneratedPart(_PreallocatedLayer):
    """The generated tokens' keys and values of every row, in buffers sized for the whole decode.

    Rows are picked at many steps (ended rows leaving, beams reordering at every step). Picking
    rewrites in place only the rows whose source changes, and only their filled positions: the
    sampled rows ahead of the beams in the batch, and beams that extend their own row, stay put.
    """

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        rows, n = len(indices), self._n
        if rows > self._k.shape[0]:  # more rows than the buffer holds: a new buffer
            self._k = torch.cat([self._k, self._k.new_empty((rows - self._k.shape[0],) + self._k.shape[1:])])
            self._v = torch.cat([self._v, self._v.new_empty((rows - self._v.shape[0],) + self._v.shape[1:])])
        moved = (indices != torch.arange(rows, device=indices.device)).nonzero()[:, 0]
        if len(moved):  # only the rows whose source differs (the gather copies before it writes)
            for buf in (self._k, self._v):
                filled = buf[:, :, :n]
                filled[moved] = filled[indices[moved]]
        self.keys, self.values = self._k[:rows, :, :n], self._v[:rows, :, :n]


class _SharedPrefixLayer(DynamicLayer):
    """One layer's keys and values: the prompt part (``P × heads × prompt length × dim``, from the
    prefill) and the generated part (``R`` rows, one token per step)."""

    def __init__(self, capacity: int, prompt_k: torch.Tensor, prompt_v: torch.Tensor):
        super().__init__()
        self.lazy_initialization(prompt_k, prompt_v)
        self.prompt_k, self.prompt_v = prompt_k, prompt_v
        self.generated = _GeneratedPart(capacity)

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = self.generated.update(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prompt_k.shape[-2] + self.generated.get_seq_length()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.generated.batch_select_indices(rows)
        if self.generated.is_initialized:
            self.keys, self.values = self.generated.keys, self.generated.values

    def select_prompts(self, prompts: torch.Tensor) -> None:
        self.prompt_k, self.prompt_v = self.prompt_k[prompts], self.prompt_v[prompts]


class SharedPrefixCache(Cache):
    """The decode loop's cache: the prompt part once per prompt, the generated part per row.

    ``prompt_kv`` holds each layer's prompt keys and values (``P × kv heads × prompt length × dim``,
    left-padded: the prefill's); ``prompt_mask`` (``P × prompt length``, bool) marks the real (not
    padding) positions; ``row_prompt`` (``R``) says which prompt each row continues. Rows of one
    prompt may be anywhere in the batch; :meth:`batch_select_indices` picks and reorders rows
    (ended rows leaving, beams extending), and drops prompts no row continues any more.
    """

    def __init__(self, capacity: int, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]],
                 prompt_mask: torch.Tensor, row_prompt: torch.Tensor):
        super().__init__(layers=[_SharedPrefixLayer(capacity, k, v) for k, v in prompt_kv])
        self.prompt_mask = prompt_mask.bool()
        self._bias = None
        self._set_rows(row_prompt.to(prompt_mask.device))

    def prompt_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``prompt_mask`` as an additive bias (0 or -inf), ``P × 1 × 1 × prompt length``."""
        if self._bias is None or self._bias.dtype != dtype:
            bias = torch.zeros(self.prompt_mask.shape, dtype=dtype, device=self.prompt_mask.device)
            self._bias = bias.masked_fill(~self.prompt_mask, -float("inf"))[:, None, None, :]
        return self._bias

    def _set_rows(self, row_prompt: torch.Tensor) -> None:
        """Where each row's query goes in the per-prompt matrix products: prompt ``p`` owns slots
        ``p·G … p·G + G − 1`` (``G``: most rows of one prompt); unused slots repeat row 0."""
        self.row_prompt = row_prompt
        num_prompts, rows = self.prompt_mask.shape[0], len(row_prompt)
        counts = torch.bincount(row_prompt, minlength=num_prompts)
        self.group = int(counts.max())
        order = torch.argsort(row_prompt, stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(rows, device=row_prompt.device) - first[row_prompt[order]]
        self.row_slot = torch.empty_like(row_prompt)
        self.row_slot[order] = row_prompt[order] * self.group + rank
        self.slot_row = torch.zeros(num_prompts * self.group, dtype=torch.long, device=row_prompt.device)
        self.slot_row[self.row_slot] = torch.arange(rows, device=row_prompt.device)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        row_prompt = self.row_prompt[indices]
        for layer in self.layers:
            layer.select_rows(indices)
        used = torch.unique(row_prompt)  # sorted
        if len(used) < self.prompt_mask.shape[0]:
            for layer in self.layers:
                layer.select_prompts(used)
            self.prompt_mask, self._bias = self.prompt_mask[used], None
            row_prompt = torch.searchsorted(used, row_prompt)
        self._set_rows(row_prompt)


def _attend(q, k, v, bias, scale: float):
    """Softmax attention of ``q`` over ``k``/``v`` (``bias``: additive mask or None): the output and
    each query's log-sum-exp of scores (float32), which :func:`shared_prefix_attention` merges by.
    On CPU, PyTorch's fused flash kernel returns both in one pass; elsewhere plain matrix products."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        out, lse = _CPU_FLASH(q, k, v, attn_mask=bias, scale=scale)
        return out, lse.float()
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            shared_prefix: SharedPrefixCache | None = None, **kwargs):
    """Attention for one decode step over the prompt part and the generated part (module docstring);
    plain SDPA for anything else (the prefill, forward passes without a :class:`SharedPrefixCache`)."""
    if shared_prefix is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer = shared_prefix.layers[module.layer_idx]
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    per_kv = heads // kv_heads  # query heads sharing one key/value head: they become query rows
    scale = dim ** -0.5 if scaling is None else scaling
    q = query[:, :, 0].reshape(rows, kv_heads, per_kv, dim)
    num_prompts, group = shared_prefix.prompt_mask.shape[0], shared_prefix.group

    # prompt part: each prompt's keys once, against the queries of all of its rows
    qp = q[shared_prefix.slot_row].view(num_prompts, group, kv_heads, per_kv, dim)
    qp = qp.permute(0, 2, 1, 3, 4).reshape(num_prompts, kv_heads, group * per_kv, dim)
    o_p, lse_p = _attend(qp, layer.prompt_k, layer.prompt_v, shared_prefix.prompt_bias(query.dtype), scale)

    def to_rows(x):  # (prompt, kv head, slot × per_kv, ·) -> (row, kv head, per_kv, ·)
        x = x.reshape(num_prompts, kv_heads, group, per_kv, -1).permute(0, 2, 1, 3, 4)
        return x.reshape(num_prompts * group, kv_heads, per_kv, -1)[shared_prefix.row_slot]
    o_p, lse_p = to_rows(o_p), to_rows(lse_p[..., None])

    # generated part: each row's own keys (no padding: every row has generated every step)
    o_g, lse_g = _attend(q.contiguous(), key, value, None, scale)
    lse_g = lse_g[..., None]

    lse = torch.logaddexp(lse_p, lse_g)
    out = o_p.float() * torch.exp(lse_p - lse) + o_g.float() * torch.exp(lse_g - lse)
    return out.to(query.dtype).reshape(rows, 1, heads, dim), None
