"""Building blocks of the embedded generator: a byte-level BPE tokenizer and a small Llama.

No generator weights can be fetched offline, so the project trains its own decoder-only model on
BIG-Bench. Llama is the architecture because vLLM and transformers both run it; a small vocabulary
keeps CPU sampling fast (the softmax over a 50k vocabulary dominates ``generate`` on CPU).

Prompt format (shared by training, both generation backends and tests)::

    <s> {instruction} \\n{response} </s>

The instruction already ends with BIG-Bench's ``A:`` prefix; :func:`prompt_text` adds the
newline that separates it from the response. Prompts longer than the model was trained on are cut
from the *left* (the saved tokenizer has ``truncation_side="left"``; BOS is kept), so the end of
the instruction, where the question and ``A:`` are, survives.

Also here: where the embedded generator lives (:func:`default_generator_path`; what a generator
*name* means is :func:`cappy_core.generation.resolve_generator`), plain transformers generation
(:func:`generate_texts`) and the quality check that ``cappy generator train`` reports
(:func:`evaluate_generator`: greedy Rouge-L and the spread of sampled candidates).

Tested in ``tests/core/test_lm.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from cappy_core.data.records import Example

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
        truncation_side="left",  # keep the end of an instruction (its "A:" part), as training does
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
    """Save as a Hugging Face folder (safetensors + tokenizer + ``cappy_generator.json`` + a model
    card) atomically: a half-written generator is never left where the main job looks for one."""
    import json

    from cappy_core.generation.card import generator_card
    from cappy_core.io import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2) + "\n")
        (tmp / "README.md").write_text(generator_card(metadata or {}, path.name))
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


# --- where the embedded generator lives ------------------------------------------------------

DEFAULT_GENERATOR_NAME = "bigbench-llama"
METADATA_FILE = "cappy_generator.json"


def default_generator_path(name: str = DEFAULT_GENERATOR_NAME, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/generator/<name>``, the cache being ``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``."""
    from cappy_core.data.cache import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "generator" / name


def is_generator_dir(path: str | Path) -> bool:
    """A complete generator folder (``save_generator`` writes it atomically, so these files being
    there means the save finished)."""
    path = Path(path)
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", METADATA_FILE))


def generator_metadata(path: str | Path) -> dict:
    """The ``cappy_generator.json`` a generator folder describes itself with ({} if absent)."""
    import json

    f = Path(path) / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


# --- generation and its quality check --------------------------------------------------------

def generate_texts(model, tokenizer, instructions: Sequence[str], *, max_prompt_tokens: int = 512,
                   max_new_tokens: int = 64, num_samples: int = 1, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 32) -> list[list[str]]:
    """``num_samples`` responses per instruction with transformers ``generate`` (greedy unless
    ``do_sample``). Prompts are :func:`prompt_text`, left-truncated to ``max_prompt_tokens``
    (BOS kept), batched by length. Not the project's generation backend (that one also returns
    log-likelihoods); this is the generator trainer's own quick check."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(prompt_text(x), truncation=True, max_length=max_prompt_tokens)["input_ids"]
               for x in instructions]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample \
        else dict(do_sample=False)
    torch.manual_seed(seed)
    out: list[list[str]] = [[] for _ in instructions]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
        mask = (torch.arange(width, device=device)[None, :] >=
                torch.tensor([width - len(encoded[i]) for i in idx], device=device)[:, None]).long()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_samples, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = texts[j * num_samples:(j + 1) * num_samples]
    return out


def evaluate_generator(model, tokenizer, examples_by_task: Mapping[str, Sequence["Example"]], *,
                       max_prompt_tokens: int = 512, max_new_tokens: int = 64, num_samples: int = 4,
                       seed: int = 0, batch_size: int = 32, deadline: float | None = None) -> dict:
    """Is there something to select from? Per task: greedy Rouge-L, mean Rouge-L of
    ``num_samples`` plain samples (temperature 1, no truncation), their mean spread (best − worst
    per instruction) and the oracle (best of greedy + samples). Task means are averaged
    unweighted, ×100, as the paper reports. Examples without references are skipped.

    With ``deadline`` (a ``time.monotonic()`` value) tasks not started by then are skipped and
    listed under ``"skipped_tasks"``, so a time budget holds on a busy machine."""
    import time

    from cappy_core.labeling.rouge import rouge_l

    t0 = time.perf_counter()
    tasks: dict[str, dict] = {}
    skipped: list[str] = []
    for task, examples in examples_by_task.items():
        if deadline is not None and time.monotonic() >= deadline:
            skipped.append(task)
            continue
        examples = [e for e in examples if e.references]
        if not examples:
            continue
        instructions = [e.instruction for e in examples]
        kw = dict(max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size)
        greedy = [g[0] for g in generate_texts(model, tokenizer, instructions, **kw)]
        samples = (generate_texts(model, tokenizer, instructions, num_samples=num_samples, do_sample=True,
                                  seed=seed, **kw) if num_samples > 0 else [[] for _ in examples])
        g_scores, s_means, spreads, oracles = [], [], [], []
        for e, g, ss in zip(examples, greedy, samples):
            gs = rouge_l(g, e.references)
            sc = [rouge_l(s, e.references) for s in ss]
            g_scores.append(gs)
            if sc:
                s_means.append(sum(sc) / len(sc))
                spreads.append(max(sc) - min(sc))
            oracles.append(max([gs] + sc))

        def mean(xs):
            return 100 * sum(xs) / len(xs) if xs else float("nan")

        tasks[task] = {
            "examples": len(examples), "greedy_rouge_l": mean(g_scores), "sample_rouge_l": mean(s_means),
            "sample_spread": mean(spreads), "oracle_rouge_l": mean(oracles),
            "distinct_greedy": len(set(greedy)),
            "example": {"instruction_end": examples[0].instruction[-160:],
                        "reference": examples[0].references[0][:160], "greedy": greedy[0][:160]},
        }
    keys = ("greedy_rouge_l", "sample_rouge_l", "sample_spread", "oracle_rouge_l")
    summary = {k: sum(t[k] for t in tasks.values()) / len(tasks) if tasks else float("nan") for k in keys}
    return {**summary, "num_samples": num_samples, "max_new_tokens": max_new_tokens,
            "num_examples": sum(t["examples"] for t in tasks.values()),
            "seconds": time.perf_counter() - t0, "skipped_tasks": skipped, "tasks": tasks}
