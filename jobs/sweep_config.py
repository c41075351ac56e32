"""``cappy sweep``'s settings: :class:`SweepConfig`, its checks and the rules read off it alone.

Ray-free, like :mod:`jobs.sweep_layout` and :mod:`jobs.sweep_plan`, which the driver
(:mod:`jobs.sweep`), ``--dry-run``, ``cappy serve`` and the benchmarks share. Fields marked
``"key"`` define a task's result and those marked ``"sampling"`` the sampled candidates
(:func:`cappy_core.config.key_values`); the finetuning recipe is the one
:class:`~cappy_core.scorer.schedule.ScorerSchedule`, a section (``--schedule.lr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import CacheOptions, SettingError
from cappy_core.data.tasks import LOCAL_TASKS
from cappy_core.generation import SamplingSpec
from cappy_core.scorer.schedule import ScorerSchedule
from cappy_core.selection.scored_tables import SIGNALS
from cappy_core.selection.selectors import ALL_SIGNALS
from jobs.cli import presets
from jobs.tracking import TrackingOptions


@dataclass
class SweepConfig(CacheOptions, TrackingOptions):
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS), metadata={
        "help": "'all45' (the paper's 45 generative tasks; 44 offline) or task names"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json), e.g. for tellmewhy"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder (default ~/cappy_runs/sweep-<preset>), or a URI (s3://, gs://, ...: built in a local "
                "staging folder under the cache, uploaded after each task)"})
    redo: bool = field(default=False, metadata={"help": "recompute every task, even finished ones"})
    cache: bool = field(default=True, metadata={
        "help": "reuse and keep stage outputs in the stage cache (<cache>/stages: sampled candidates and finetuned "
                "scorers, keyed by everything they depend on); --no-cache: neither, and candidates are sampled under OUT"})
    task_timeout_s: float = field(default=0.0, metadata={
        "help": "cancel a task (finetune + score) running longer than this and record it as failed; a rerun "
                "retries it (0: no limit)"})
    task_retries: int = field(default=3, metadata={
        "help": "times a task whose worker process died (killed, out of memory, node lost) runs again within "
                "the sweep; an error the task raises is not retried: it is recorded as failed"})
    # generator
    generator: Optional[str] = field(default=None, metadata={"key": True,
        "help": "generator folder or hub id (default: the embedded Llama, trained into the cache if missing)"})
    backend: str = field(default="vllm", metadata={"key": True, "sampling": True,
        "choices": ["vllm", "hf"], "help": "vllm (decoder-only) or hf (transformers; also seq2seq such as FLAN-T5)"})
    generator_tasks: list[str] = field(default_factory=lambda: ["sweep"], metadata={
        "help": "what the embedded generator trains on: 'sweep' (this sweep's tasks), 'all45' or task names"})
    generator_updates: int = field(default=1500, metadata={
        "help": "optimizer updates of the embedded generator (when it is missing; fixed, so reruns agree)"})
    generator_time_budget_s: float = field(default=0.0, metadata={
        "help": "optional wall-clock cap on training the embedded generator (0: none)"})
    # sampling
    max_examples_per_task: Optional[int] = field(default=40, metadata={"key": True, "sampling": True,
        "help": "evaluate on the first N validation instructions of each task (none: all)"})
    max_train_examples_per_task: Optional[int] = field(default=40, metadata={"key": True, "sampling": True,
        "help": "finetune on candidates for the first N train instructions of each task (none: all)"})
    sampling: SamplingSpec = field(default_factory=SamplingSpec, metadata={
        "key": True, "sampling": True, "help": "how candidates are drawn (decodings, samples, tokens, seed: these "
        "define them) and spread (batches, generator actors)"})
    # scorer
    scorer: Optional[str] = field(default=None, metadata={"key": True,
        "help": "scorer to finetune from: a folder, a hub id (btan2/cappy-large) or 'minilm' "
                "(default: the scorer pretrained into the cache with `cappy pretrain --preset PRETRAIN_PRESET`)"})
    pretrain_preset: str = field(default="local", metadata={"choices": sorted(presets("pretrain")),
        "help": "pretrain preset used when no --scorer is given and none is cached"})
    finetune: bool = field(default=True, metadata={"key": True,
        "help": "finetune per task (--no-finetune: score with the init scorer as is)"})
    train_size: int = field(default=512, metadata={"key": True, "help": "finetuning pairs per task (cut or tiled)"})
    max_length: int = field(default=128, metadata={"key": True, "help": "scorer pair truncation length in tokens"})
    schedule: ScorerSchedule = field(default_factory=lambda: ScorerSchedule(lr=1e-4, batch_size=16, micro_batch_size=8),
                                     metadata={"key": True, "help": "the finetuning recipe of every scorer the sweep "
                                               "finetunes (the cappy row's, the shared and the selector scorers); its "
                                               "seed also seeds the pairs"})
    finetune_scope: str = field(default="task", metadata={"key": True, "choices": ["task", "all"], "help": "per task or all"})
    selector_loss: str = field(default="same", metadata={"key": True, "choices": ["same", "listwise", "listwise+mse"], "help":
                               "the fused selector's Cappy signal: same: the cappy row's scorer; listwise[+mse]: "
                               "a second per-task scorer finetuned on the same pairs with that loss"})
    selector_scope: str = field(default="task", metadata={"key": True, "choices": ["task", "all"], "help": "with "
                                "--selector-loss: task: a selector scorer per task; all: one selector scorer "
                                "finetuned on every task's pairs together (each task's train_size pairs), before the "
                                "tasks"})
    shared_torch_threads: int = field(default=0, metadata={"help": "torch threads (and CPUs reserved) of a "
                                      "finetune on every task's pairs (--finetune-scope/--selector-scope all), "
                                      "which runs alone before the tasks; 0: --torch-threads"})
    dev_examples_per_task: int = field(default=0, metadata={"key": True, "help": "hold out the last N sampled train "
                                       "instructions per task from finetuning; the fused selector is fitted on them"})
    selector_signals: list[str] = field(default_factory=lambda: list(SIGNALS), metadata={
        "key": True, "choices": list(ALL_SIGNALS), "help": "what the fused selector weighs, each z-scored within an "
        "instruction: the Cappy score, the mean log-likelihood, MBR consensus, and the candidate's length in words "
        "(signed weight); weights fitted on dev"})
    zero_shot: bool = field(default=False, metadata={"help": "also score each task with a selector that never saw "
                            "it (the same finetune on the other tasks' pairs, fused weights fitted on their dev "
                            "instructions): rows cappy-0shot and fused-0shot, what the endpoint does for an unseen "
                            "task; one more finetune per task (kept under OUT/tasks/_zero_shot)"})
    score_dtype: str = field(default="float32", metadata={"key": True,
        "choices": ["float32", "bfloat16"], "help": "dtype for scoring the validation candidates"})
    keep_scorers: bool = field(default=False, metadata={
        "help": "save each task's finetuned scorer under OUT/tasks/<task>/scorer"})
    push_to_hub: Optional[str] = field(default=None, metadata={
        "metavar": "ORG/PREFIX", "help": "with --keep-scorers: push each kept scorer to the Hugging Face hub once the report is written, "
                "as ORG/PREFIX-<task> (its selector scorer, with the fused weights, as ORG/PREFIX-<task>-selector); "
                "give ORG/PREFIX"})
    private: bool = field(default=False, metadata={
        "help": "with --push-to-hub: create the model repos private (an existing repo keeps its visibility)"})
    # per-task resources
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per task (finetune + score)"})
    gpus_per_task: float = field(default=0.0, metadata={"help": "GPUs per task (fractions pack tasks on a GPU)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per task on CPU"})

    def __post_init__(self) -> None:
        """Settings that cannot run, refused before any stage does (``--dry-run`` too)."""
        for name in ("train_size", "torch_threads", "max_length"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        for name, what in (("task_timeout_s", " (0: no limit)"), ("task_retries", ""),
                           ("shared_torch_threads", " (0: torch_threads)"), ("dev_examples_per_task", "")):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0{what}, got {getattr(self, name)}", related=["torch_threads"])
        cap = self.max_train_examples_per_task
        if self.finetune and cap is not None and self.dev_examples_per_task >= cap:
            raise SettingError("dev_examples_per_task", f"{self.dev_examples_per_task} leaves none of the {cap} train "
                               "instructions (max_train_examples_per_task) to finetune on",
                               related=["max_train_examples_per_task"])
        if self.zero_shot and not (self.finetune and self.dev_examples_per_task > 0):
            raise SettingError("zero_shot", "fits its fused weights on the other tasks' dev instructions: it needs "
                               "finetune and dev_examples_per_task > 0", related=["dev_examples_per_task", "finetune"])
        if self.push_to_hub and not self.keep_scorers:
            raise SettingError("push_to_hub", "pushes the scorers --keep-scorers keeps: add --keep-scorers",
                               related=["keep_scorers"])
        if not self.selector_signals or len(set(self.selector_signals)) != len(self.selector_signals):
            raise SettingError("selector_signals", f"{self.selector_signals}: name each signal once, at least one")
        if self.selector_scope == "all" and self.selector_loss == "same":
            raise SettingError("selector_scope", "all finetunes one selector scorer for every task: it needs "
                               "selector_loss listwise (or listwise+mse)", related=["selector_loss"])
        if self.selector_loss != "same" and not (self.finetune and self.finetune_scope == "task"):
            raise SettingError("selector_loss", f"{self.selector_loss} finetunes a second scorer per task: it needs "
                               "finetune and finetune_scope task", related=["finetune_scope", "finetune"])

    @property
    def shared_selector(self) -> bool:
        """One selector scorer for every task, finetuned before the tasks (``selector_scope: all``)."""
        return self.finetune and self.selector_loss != "same" and self.selector_scope == "all"

    @property
    def trains_on_every_task(self) -> bool:
        """A scorer finetuned on every task's pairs (``finetune_scope: all`` or a shared selector):
        every task's train candidates are needed, and the task list is part of each result's key."""
        return self.finetune and (self.finetune_scope == "all" or self.shared_selector)
