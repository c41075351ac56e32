"""What to load as a generator, as one value: :class:`GeneratorSpec`.

The sampler (``jobs.sample_label``), serve's Generator and the sampling benchmark each describe their
generator with one, and the spec alone decides which of its settings a backend's constructor gets, so
the three cannot drift apart on defaults or checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from cappy_core.generation.base import DEFAULT_PROMPT_TOKENS, Generator, check_backend_settings
from cappy_core.generation.loading import BACKENDS, load_generator, unknown_backend


@dataclass(frozen=True)
class GeneratorSpec:
    """``model`` (a folder or hub id, as :func:`~cappy_core.generation.resolve_generator` gives it)
    on ``backend`` (``vllm`` or ``hf``), and how to load it. A setting left None keeps the backend's
    default. Each backend takes its own settings and ignores the other's, so one spec stands for a
    whole command line, and serve's ``auto`` can fall back from vLLM to transformers with it.
    ``engine_args`` are further ``vllm.LLM`` options (e.g. ``tensor_parallel_size``)."""

    model: str
    backend: str
    max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # transformers backend (hf) only
    device: str | None = None
    batch_rows: int | None = None
    decode_loop: str | None = None
    # vLLM backend only
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    async_engine: bool = False
    engine_args: Mapping[str, Any] = field(default_factory=dict)

    OWN_SETTINGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "hf": ("device", "batch_rows", "decode_loop"),
        "vllm": ("max_model_len", "kv_cache_memory_bytes", "gpu_memory_utilization", "async_engine"),
    }

    def __post_init__(self):
        # Checked here, before anything loads (a Ray actor, an engine process), by the setting's name.
        if self.backend not in BACKENDS:
            raise unknown_backend(self.backend)
        check_backend_settings(self.max_prompt_tokens, self.decode_loop)
        if self.backend == "vllm" and self.gpu_memory_utilization is not None \
                and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be > 0 and <= 1, got {self.gpu_memory_utilization}")
        if self.backend == "hf" and self.engine_args:
            raise ValueError(f"{', '.join(sorted(self.engine_args))}: not a setting of the hf backend "
                             "(vLLM engine options are for the vllm backend)")

    @classmethod
    def from_kwargs(cls, model: str, backend: str, **kwargs: Any) -> GeneratorSpec:
        """A spec from :func:`~cappy_core.generation.load_generator`'s keyword arguments (serve's
        ``load_kwargs``): the spec's settings by name, any other one a vLLM engine option."""
        names = {f.name for f in fields(cls)} - {"model", "backend", "engine_args"}
        return cls(model, backend, **{k: v for k, v in kwargs.items() if k in names},
                   engine_args={k: v for k, v in kwargs.items() if k not in names})

    def backend_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``load_generator(backend, model, ...)``: the settings every backend
        takes, then this backend's own that are set."""
        kwargs: dict[str, Any] = {"max_prompt_tokens": self.max_prompt_tokens, "dtype": self.dtype,
                                  "allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code}
        kwargs.update((k, getattr(self, k)) for k in self.OWN_SETTINGS[self.backend] if getattr(self, k) is not None)
        if self.backend == "vllm":
            kwargs.update(self.engine_args)
        return kwargs

    def load(self) -> Generator:
        """The generator (:func:`~cappy_core.generation.load_generator` with :meth:`backend_kwargs`)."""
        return load_generator(self.backend, self.model, **self.backend_kwargs())
