"""cappy_core.config: dataclass configs from defaults < --preset < --config < flags, with sections
(a dataclass embedded whole: a YAML mapping and ``--section.field`` flags), errors that name the
file and key, and settings named by the library, shown by the CLI as flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from cappy_core.config import (ConfigError, SettingError, build, build_parser, config_from_args, key_values,
                               load_yaml, run_main, to_dict)


@dataclass(frozen=True)
class Recipe:
    """a recipe"""

    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = 10
    fused: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise SettingError("lr", f"must be > 0, got {self.lr}")
        if self.steps % 2:
            raise SettingError("steps", f"{self.steps} must be even with lr {self.lr}", related=["lr"])


@dataclass
class Job:
    name: str = field(default="x", metadata={"key": True})
    recipe: Recipe = field(default_factory=lambda: Recipe(steps=4), metadata={"key": True})
    workers: int = 1
    tags: list[str] = field(default_factory=list)
    cap: Optional[int] = None


def parse(argv, presets=None):
    parser = build_parser(Job, prog="job", description="", presets=presets)
    return config_from_args(Job, parser.parse_args(argv), presets)


def test_a_section_is_a_yaml_mapping_and_dotted_flags_over_the_jobs_own_defaults(tmp_path):
    assert parse([]).recipe == Recipe(steps=4)  # the job's default instance, not Recipe()'s
    preset = tmp_path / "job_small.yaml"
    preset.write_text("workers: 2\nrecipe:\n  lr: 0.5\n  fused: true\n")
    override = tmp_path / "override.yaml"
    override.write_text("recipe:\n  steps: 8\n")
    cfg = parse(["--preset", "small", "--config", str(override), "--recipe.lr", "0.25", "--no-recipe.fused"],
                {"small": preset})
    # per field: preset < --config < flags, each leaving the section's other fields alone
    assert cfg.recipe == Recipe(lr=0.25, steps=8, fused=False) and cfg.workers == 2
    assert to_dict(cfg)["recipe"] == {"lr": 0.25, "steps": 8, "fused": False}
    assert build(Job, load_yaml(Job, preset)).recipe == Recipe(lr=0.5, steps=4, fused=True)


def test_unknown_and_mistyped_keys_name_the_file_and_the_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\n")  # belongs in the section
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'lr' for Job; did you mean recipe.lr\?"):
        load_yaml(Job, bad)
    bad.write_text("recipe:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: recipe.unknown key 'lrr' for Recipe; did you mean lr\?"):
        load_yaml(Job, bad)
    bad.write_text("recipe: 3\n")
    with pytest.raises(ConfigError, match="recipe: expected a mapping of Recipe keys"):
        load_yaml(Job, bad)
    bad.write_text("recipe:\n  steps: many\n")
    with pytest.raises(ConfigError, match="recipe.steps: expected an integer"):
        load_yaml(Job, bad)


def test_the_library_names_the_setting_and_the_command_line_shows_the_flag(capsys):
    with pytest.raises(SettingError) as e:
        parse(["--recipe.steps", "3", "--recipe.lr", "0.5"])
    assert e.value.setting == "recipe.steps" and str(e.value) == "recipe.steps 3 must be even with recipe.lr 0.5"
    assert e.value.as_flags() == "--recipe.steps 3 must be even with --recipe.lr 0.5"

    def body():
        parse(["--recipe.lr", "-1"])

    assert run_main(body) == 2
    assert capsys.readouterr().err == "error: --recipe.lr must be > 0, got -1.0\n"


def test_help_groups_a_sections_flags_with_the_jobs_defaults():
    text = build_parser(Job, prog="job", description="").format_help()
    assert "recipe (--recipe.*):" in text and "a recipe" in text
    assert "--recipe.lr LR" in text and "learning rate (default: 0.001)" in text
    assert "--recipe.steps STEPS" in text and "default: 4" in text  # the job's own default
    assert "--recipe.fused, --no-recipe.fused" in text


def test_key_values_derive_what_defines_a_result_from_the_marked_fields():
    cfg = Job(name="a", recipe=Recipe(lr=0.5, steps=2), workers=3)
    assert key_values(cfg) == {"name": "a", "recipe.lr": 0.5, "recipe.steps": 2, "recipe.fused": False}
    assert key_values(cfg, flat_sections=True) == {"name": "a", "lr": 0.5, "steps": 2, "fused": False}


@dataclass
class Picky:
    mode: str = field(default="a", metadata={"choices": ["a", "b"], "help": "which"})
    kinds: list[str] = field(default_factory=lambda: ["x"], metadata={"choices": ["x", "y"]})
    recipe: Recipe = field(default_factory=Recipe)


def test_help_shows_choices_and_the_values_of_the_preset_and_config_on_the_command_line(tmp_path):
    preset = tmp_path / "job_fast.yaml"
    preset.write_text("mode: b\nrecipe: {steps: 6}\n")
    plain = build_parser(Picky, prog="job", description="d").format_help()
    assert "--mode {a,b}" in plain and "--kinds {x,y} [{x,y} ...]" in plain
    assert "which (default: 'a')" in plain and "Defaults shown" not in plain
    shown = build_parser(Picky, prog="job", description="d", presets={"fast": preset},
                         argv=["--preset", "fast", "--help"]).format_help()
    assert "which (default: 'b')" in shown and "default: 6" in shown  # a section's value too
    assert "Defaults shown are the values of --preset fast (job_fast.yaml)" in shown
    extra = tmp_path / "more.yaml"
    extra.write_text("mode: a\n")
    both = build_parser(Picky, prog="job", description="d", presets={"fast": preset},
                        argv=["--preset=fast", "--config", str(extra), "-h"]).format_help()
    assert "which (default: 'a')" in both and f"--config {extra}" in both and "default: 6" in both


def test_print_config_yaml_reads_back_to_the_same_config(tmp_path, capsys):
    from cappy_core.config import config_yaml, resolve_and_run

    preset = tmp_path / "job_fast.yaml"
    preset.write_text("workers: 3\nrecipe: {steps: 6}\n")
    presets = {"fast": preset}
    parser = build_parser(Job, prog="job", description="", presets=presets)
    args = parser.parse_args(["--preset", "fast", "--recipe.lr", "0.5", "--tags", "a", "b", "--print-config"])
    ran = []
    assert resolve_and_run(Job, args, presets, ran.append) == 0 and ran == []  # printed, did not run
    printed = capsys.readouterr().out
    assert "workers: 3" in printed and "lr: 0.5" in printed
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    again = parse(["--config", str(saved)])
    assert again == parse(["--preset", "fast", "--recipe.lr", "0.5", "--tags", "a", "b"], presets)
    assert config_yaml(again) == printed
