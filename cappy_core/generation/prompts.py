"""What a decoder-only generator is conditioned on, for an instruction or for chat messages.

Two prompt formats (``--sampling.prompt-format``): ``plain``, the instruction as it is (the paper's
format, and the only one a model without a chat template has), and ``chat``, the instruction as
one user message through the tokenizer's chat template (an instruct model such as SmolLM2). The
generator's prompt encoder (:meth:`~cappy_core.generation.Generator.encode_prompts`) then adds the
tokenizer's own special tokens and one newline (:func:`~cappy_core.generation.embedded_model.prompt_text`);
:func:`chat_prompt` leaves those out of the template's text so that what the model reads is the
template's text exactly. Candidates are the generated answer only: the template is the prompt.
Serve renders ``/v1/chat/completions`` messages with :func:`chat_prompt` too. Tested in
``tests/serve/test_serve_units.py`` and, on a real tokenizer, ``tests/core/test_packaged_generator.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

PROMPT_FORMATS = ("plain", "chat")


def plain_chat(messages: Sequence[dict]) -> str:
    """The instruction for chat messages when the generator's tokenizer has no chat template: one
    user message is its text as it is (so it matches /v1/select with that instruction); otherwise
    one ``Role: text`` line per message and a final ``Assistant:`` cue."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join([f"{m['role'].capitalize()}: {m['content']}" for m in messages] + ["Assistant:"])


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text puts the tokenizer's BOS token first (Llama-2 style tokenizers do;
    SmolLM2's, whose BOS is ``<|im_start|>``, does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == bos


def chat_prompt(messages: Sequence[dict], tokenizer: Any) -> str:
    """The prompt chat messages make: the tokenizer's chat template with the generation prompt
    when it has one, less the BOS text the prompt encoder adds itself and one trailing newline
    (which the encoder appends); else :func:`plain_chat`."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat(messages)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]
    return text[:-1] if text.endswith("\n") else text


def format_instruction(instruction: str, tokenizer: Any, prompt_format: str) -> str:
    """An instruction as the generator's prompt: as it is (``plain``), or as one user message
    through the chat template (``chat``; an error for a tokenizer without one)."""
    if prompt_format == "plain":
        return instruction
    if prompt_format != "chat":
        raise ValueError(f"prompt format {prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a generator whose tokenizer has a chat template; this one has "
                         "none (use --sampling.prompt-format plain)")
    return chat_prompt([{"role": "user", "content": instruction}], tokenizer)
