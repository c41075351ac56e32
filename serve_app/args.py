"""Application arguments: what ``app_builder(args)`` accepts, as pydantic models.

These are the ``args:`` of the application in ``serve_app/config.yaml`` (``serve run`` /
``serve deploy``), of a RayService's ``serveConfigV2``, and what ``cappy serve`` builds. Unknown
keys are an error that names the key, so a typo never falls back to a default silently.

Three sections, one per deployment: ``generator``, ``scorer`` and ``ingress``. Each carries its
replica resources (``num_cpus``, ``num_gpus``, ``max_ongoing_requests``, and ``num_replicas`` or
an ``autoscaling_config``); :func:`serve_app.app.build_app` turns them into ``.options(...)``.
A ``deployments:`` section of a Serve config file (names ``Generator``, ``Scorer``, ``Ingress``)
still overrides them, as Ray documents.

Per-task scorers: the scorer's multiplexed model id is a task name (or any id you choose). An id
resolves to a checkpoint folder by, in order: ``scorer.task_scorers[id]`` (explicit map, id →
folder or hub id); ``<scorers_dir>/<id>/`` (a folder written by ``Scorer.save_pretrained``);
``<scorers_dir>/<id>/selector_scorer/`` then ``<scorers_dir>/<id>/scorer/`` (a sweep's ``OUT/tasks``
with ``--keep-scorers``: a task finetuned with a selector scorer of its own, ``--selector-loss``,
is served by that one, which holds the task's fused weights, so ``selector: auto`` picks as the
sweep's ``cappy+lm+mbr`` row did);
``<scorers_dir>/finetune-<id>/scorer/`` (where ``cappy finetune --task <id>`` puts it, so
``scorers_dir: ~/cappy_runs`` serves every finetuned task). An id that resolves to nothing is
scored by the pretrained default scorer (``unknown_task: default``, the response says
``scorer: "default"``) or refused with 422 (``unknown_task: error``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from cappy_core.generation import MAX_NEW_TOKENS, MIN_NEW_TOKENS, PAPER_DECODING_NAMES, PAPER_NUM_SAMPLES

#: What a task / multiplexed model id may look like: no slashes, so an id is never a path.
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_TASK_ID = re.compile(TASK_ID_PATTERN)


#: One ``IngressArgs.api_key_sha256`` entry: the sha256 hex digest of an API key, lowercase.
SHA256_HEX = r"^[0-9a-f]{64}$"
_NOT_A_DIGEST = "<not a sha256 hex digest>"  # what an error shows instead of the entry (a raw key, perhaps)


#: ``Retry-After`` (seconds) of every 503 the app answers: the ingress's and Serve's own refusals.
RETRY_AFTER_S = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaArgs(_Strict):
    """Resources and scaling of one deployment."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs per replica (fractional is fine)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractional is fine)")
    max_ongoing_requests: int = Field(16, ge=1, description="concurrent requests one replica accepts")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for a replica beyond those; "
                                     "more are refused at once with 503 + Retry-After (-1: no limit)")
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replica count (default 1); "
                                        "give this or autoscaling_config")
    autoscaling_config: Optional[dict[str, Any]] = Field(
        None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, "
        "target_ongoing_requests, upscale_delay_s, downscale_delay_s, ...)")

    @model_validator(mode="after")
    def _one_scaling(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def capacity(self) -> int:
        """Calls the deployment holds at most, running or queued: replicas (``num_replicas``, or
        autoscaling's ``max_replicas``) × ``max_ongoing_requests`` + ``max_queued_requests``;
        -1 when the queue has no limit."""
        if self.max_queued_requests < 0:
            return -1
        replicas = (self.autoscaling_config or {}).get("max_replicas", 1) if self.num_replicas is None \
            else self.num_replicas
        return int(replicas) * self.max_ongoing_requests + self.max_queued_requests

    def deployment_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        # backpressure_config: a call Serve refuses because this queue is full (at the HTTP proxy for
        # the Ingress) is a 503 with Retry-After, as the ingress's own 503s are
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests,
                                "max_queued_requests": self.max_queued_requests,
                                "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S}}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class GeneratorArgs(ReplicaArgs):
    """The candidate generator (a ``cappy_core.generation`` backend)."""

    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="vllm, hf (transformers), or auto: vllm on a CUDA GPU when it is installed, else hf "
                    "(on CPU the hf loop is ~12x faster than vLLM-CPU)")
    # vLLM's async engine generates for every ongoing request at once (continuous batching), so this
    # is the engine's batch: twice the 16 that suited one thread running one batch at a time.
    max_ongoing_requests: int = Field(32, ge=1, description="concurrent requests one replica accepts (the vLLM "
                                      "engine generates for all of them at once)")
    model: Optional[str] = Field(None, description="HF folder or hub id; null: the embedded generator "
                                 "(cappy_core.generation.default_generator_path(), on the replica's node)")
    load_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to load_generator "
                                        "(dtype, device, max_prompt_tokens; vLLM engine options such as "
                                        "gpu_memory_utilization, max_model_len, tensor_parallel_size)")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, description="default new tokens per candidate (paper: 64)")
    min_new_tokens: int = Field(MIN_NEW_TOKENS, ge=0, description="minimum new tokens per candidate (paper: 3)")
    seed: int = Field(0, ge=0, description="base sampling seed (a request may give its own)")
    max_batch_size: int = Field(8, ge=1, description="transformers backend's @serve.batch: most requests per "
                                "generate() call (vLLM's async engine batches continuously)")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="transformers backend's @serve.batch: wait for a "
                                        "batch to fill")

    def user_config(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}


def _default_scorer_autoscaling() -> dict[str, Any]:
    return {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16,
            "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}


class ScorerArgs(ReplicaArgs):
    """The Cappy scorer, batched, with per-task scorers multiplexed."""

    max_ongoing_requests: int = Field(64, ge=1, description="concurrent requests per replica; must be "
                                      "≥ max_batch_size or batches never fill")
    max_queued_requests: int = Field(256, ge=-1)
    autoscaling_config: Optional[dict[str, Any]] = Field(default_factory=_default_scorer_autoscaling)
    model: str = Field("minilm", description="default (pretrained) scorer: 'minilm', a folder or a hub id")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Optional[str] = Field(None, description="cpu, cuda (default: cuda if available)")
    max_length: Optional[int] = Field(None, ge=8, description="pair truncation (default: the checkpoint's, else 512)")
    seed: int = Field(0, description="initialises a head the checkpoint lacks ('minilm')")
    selector: Optional[dict[str, float]] = Field(
        None, description="fused weights (cappy, logprob_mean, mbr) for the default scorer's picks; null: the ones "
                          "stored in its folder (selector.json), else Cappy alone. {mbr: 1}: consensus only, what "
                          "`cappy serve` uses when this machine has no trained scorer")
    task_scorers: dict[str, str] = Field(default_factory=dict, description="explicit id → checkpoint map")
    scorers_dir: Optional[str] = Field(None, description="folder of per-task scorers: <dir>/<id>/ or "
                                       "<dir>/finetune-<id>/scorer/")
    unknown_task: Literal["default", "error"] = Field(
        "default", description="an id without a scorer: use the default scorer, or answer 422")
    max_models_per_replica: int = Field(3, ge=1, description="LRU size of per-task scorers per replica")
    max_batch_size: int = Field(16, ge=1, description="@serve.batch: most requests scored together")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: wait for a batch to fill")
    score_batch_size: int = Field(128, ge=1, description="Scorer.score batch_size (pairs per forward)")
    score_max_tokens: Optional[int] = Field(1024, ge=1, description="Scorer.score max_tokens (padded "
                                            "tokens per forward; raise on a GPU)")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch threads per replica (default: "
                                         "what Ray gives the actor)")

    @model_validator(mode="before")
    @classmethod
    def _fixed_count_drops_autoscaling(cls, data):
        # num_replicas given without an autoscaling_config: a fixed count replaces the default one.
        if isinstance(data, dict) and data.get("num_replicas") is not None and "autoscaling_config" not in data:
            data = {**data, "autoscaling_config": None}
        return data

    @model_validator(mode="after")
    def _ids(self):
        bad = [k for k in self.task_scorers if not _TASK_ID.match(k)]
        if bad:
            raise ValueError(f"task_scorers: ids must match {TASK_ID_PATTERN}, got {bad}")
        return self

    def user_config(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}


class IngressArgs(ReplicaArgs):
    """The HTTP front: request limits and how long it waits for the other deployments."""

    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    max_instruction_chars: int = Field(8000, ge=1, description="longest instruction accepted")
    max_response_chars: int = Field(4000, ge=1, description="longest response / choice accepted")
    max_responses: int = Field(64, ge=1, description="most responses per /v1/score request")
    max_choices: int = Field(64, ge=1, description="most choices per /v1/classify request")
    max_candidates: int = Field(32, ge=1, description="most candidates per /v1/select request")
    max_decodings: int = Field(16, ge=1, description="most decoding names per /v1/select request")
    max_new_tokens: int = Field(256, ge=1, description="largest max_new_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    generate_timeout_s: float = Field(120.0, gt=0, description="wait for the generator at most this long")
    score_timeout_s: float = Field(60.0, gt=0, description="wait for the scorer at most this long")
    max_generating: Optional[int] = Field(
        None, ge=-1, description="most generate-then-select requests (/v1/select, /v1/chat/completions, "
        "/v1/completions) in one ingress replica at once; more are refused at once with 503 + Retry-After "
        "before their body is read (default: the Generator's capacity, replicas × max_ongoing_requests + "
        "max_queued_requests; -1: no limit)")
    retries: int = Field(2, ge=0, description="re-sends of a call no replica received (a call whose "
                         "replica died while serving it is never re-sent)")
    default_decodings: list[str] = Field(
        default_factory=lambda: list(PAPER_DECODING_NAMES),
        description="/v1/select decodings when a request names none (paper: 17 candidates)")
    default_num_samples: int = Field(PAPER_NUM_SAMPLES, ge=1,
                                     description="samples per sampling decoding (paper: 4)")
    adaptive_tau: Optional[float] = Field(
        None, ge=0, description="the adaptive rule's threshold (/v1/select with adaptive: stop generating once the "
        "fused margin reaches it); `cappy serve --sweep OUT` sets the one the sweep's cost curve fitted on dev. "
        "None: adaptive requests are refused")
    stream_keepalive_s: float = Field(5.0, gt=0, le=60, description="with stream=true, an SSE comment line this "
                                      "often while candidates generate, so the connection stays open")

    api_key_sha256: list[Annotated[str, StringConstraints(pattern=SHA256_HEX)]] = Field(
        default_factory=list, repr=False,
        description="API keys, as sha256 hex digests, never the keys themselves (a key's digest: "
        "`printf %s KEY | sha256sum`): with any, every route but GET /healthz needs 'Authorization: "
        "Bearer <key>' (else 401, code invalid_api_key); empty: no key needed. `cappy serve --api-key` "
        "and CAPPY_API_KEY hash their keys into it (serve_app.auth)")

    @field_validator("api_key_sha256", mode="before")
    @classmethod
    def _digests_only(cls, value):
        # an entry that is no digest fails as a placeholder: a raw key put here never reaches an error message
        items = value if isinstance(value, (list, tuple)) else [value]
        return [d.strip().lower() if isinstance(d, str) and re.fullmatch(SHA256_HEX, d.strip().lower())
                else _NOT_A_DIGEST for d in items]

    def limits(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(ReplicaArgs.model_fields))


class AppArgs(_Strict):
    generator: GeneratorArgs = Field(default_factory=GeneratorArgs)
    scorer: ScorerArgs = Field(default_factory=ScorerArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)


def resolve_task_scorer(task_id: str, task_scorers: dict[str, str], scorers_dir: str | None) -> str | None:
    """The checkpoint a multiplexed id names (see the module docstring), or None."""
    if not _TASK_ID.match(task_id):
        raise ValueError(f"task id {task_id!r} must match {TASK_ID_PATTERN}")
    if task_id in task_scorers:
        return os.path.expanduser(task_scorers[task_id])
    if scorers_dir:
        root = Path(scorers_dir).expanduser()
        for folder in (root / task_id, root / task_id / "selector_scorer", root / task_id / "scorer",
                       root / f"finetune-{task_id}" / "scorer"):
            if (folder / "config.json").is_file():
                return str(folder)
    return None


def list_task_scorers(task_scorers: dict[str, str], scorers_dir: str | None) -> list[str]:
    """Every id :func:`resolve_task_scorer` resolves without being told one: the explicit map's,
    ``<scorers_dir>/<id>/``, ``<scorers_dir>/<id>/scorer/`` and ``<scorers_dir>/finetune-<id>/scorer/``
    folders (sorted)."""
    ids = set(task_scorers)
    root = Path(scorers_dir).expanduser() if scorers_dir else None
    if root is not None and root.is_dir():
        for child in root.iterdir():
            if child.name.startswith("finetune-") and (child / "scorer" / "config.json").is_file():
                ids.add(child.name[len("finetune-"):])
            elif any((child / sub / "config.json").is_file() for sub in ("", "selector_scorer", "scorer")):
                ids.add(child.name)
    return sorted(i for i in ids if _TASK_ID.match(i))


def load_serve_config(path: str | os.PathLike, app_name: str | None = None) -> tuple[dict, dict]:
    """Read a Serve config file; return ``(the file as a dict, the chosen application's entry)``.

    ``app_name`` None picks the only (or first) application.
    """
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    apps = data.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    if app_name is None:
        return data, apps[0]
    for app in apps:
        if app.get("name") == app_name:
            return data, app
    raise ValueError(f"{path}: no application named {app_name!r} (have {[a.get('name') for a in apps]})")
