"""Building blocks of the embedded generator: a byte-level BPE tokenizer and a small Llama.

No generator weights can be fetched offline, so the project trains its own decoder-only model on
BIG-Bench. Llama is the architecture because vLLM and transformers both run it; a small vocabulary
keeps CPU sampling fast (the softmax over a 50k vocabulary dominates ``generate`` on CPU).

Prompt format (shared by training, both generation backends and tests)::

    <s> {instruction} \\n{response} </s>

The instruction already ends with BIG-Bench's ``A:`` prefix; :func:`prompt_text` adds the
newline that separates it from the response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def prompt_text(instruction: str) -> str:
    """What the generator is conditioned on (BOS is added by the tokenizer)."""
    return instruction + "\n"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation, no unknown tokens) as a
    ``PreTrainedTokenizerFast`` that prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=1024,
    )


def new_llama(tokenizer, *, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
              intermediate_size: int | None = None, max_position_embeddings: int = 1024, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` sized for the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_generator(model, tokenizer, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Save as a Hugging Face folder (safetensors + tokenizer) atomically: a half-written
    generator is never left where the main job looks for one."""
    import json
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cappy_generator.json").write_text(json.dumps(metadata or {}, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_generator(path: str | Path, texts: Iterable[str] | None = None, *, vocab_size: int = 512,
                   hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Path:
    """A tiny randomly initialised Llama + tokenizer folder, for tests and benchmarks."""
    texts = list(texts) if texts is not None else [
        "Q: What is the capital of France?\nA:\nParis", "The quick brown fox jumps over the lazy dog.",
        "Sort the words: pear apple fig\napple fig pear", "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] , . ?",
    ] * 20
    tok = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=1)
    model = new_llama(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      max_position_embeddings=1024, seed=seed)
    return save_generator(model, tok, path, metadata={"kind": "tiny-test-llama", "seed": seed})
