"""Job configs: dataclasses loadable from YAML and overridable from the command line.

Precedence is defaults < ``--config FILE.yaml`` < explicit CLI flags. Unknown YAML keys are an
error that names the file and the key, so a typo never silently falls back to a default.

Each field becomes a flag ``--field-name``; ``metadata={"help": ...}`` on the field becomes its
``--help`` text (``"metavar"``, ``"choices"`` and, for a list, ``"repeatable": True`` are
honoured too). Supported field types: str, int, float, bool (``--x/--no-x``), Optional of
those, ``list[str]`` / ``list[int]`` / ``list[float]`` (``nargs='+'``), and a dataclass: a
*section*, one recipe embedded whole (e.g. the scorer's :class:`~cappy_core.scorer.training.ScorerSchedule`
in every job that trains one). A section is a YAML mapping under its name and a flag per field,
``--section.field-name``; values given for it replace those of the field's default instance, so
a job can embed a recipe with defaults of its own. Its validation is its own (``__post_init__``).

Errors: a :class:`SettingError` names the setting at fault (``schedule.lr``), so the library never
speaks of flags; :func:`run_main` shows it as the flag (``--schedule.lr``).

One mechanism for every command: :func:`build_parser` (flags from the dataclass, plus
``--preset NAME`` when the job ships presets, i.e. YAML files; ``--help`` shows the values of the
``--preset``/``--config`` on the command line as the defaults), :func:`config_from_args`
(defaults < ``--preset`` < ``--config`` < flags; ``--print-config`` prints the result as YAML,
:func:`resolve_and_run`) and :func:`run_main` (bad input → one ``error:`` line and exit status 2,
no traceback). Option groups repeated across jobs are small dataclasses (:class:`CacheOptions`)
that job configs inherit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and field."""


class SettingError(ConfigError):
    """``setting`` (a field name, dotted inside a section: ``schedule.lr``) has a value that cannot
    run; ``related`` names the other settings the ``problem`` text mentions."""

    def __init__(self, setting: str, problem: str, related: Sequence[str] = ()):
        self.setting, self.problem, self.related = setting, problem, tuple(related)
        super().__init__(f"{setting} {problem}")

    def within(self, section: str) -> "SettingError":
        """The same error one section down: ``lr`` → ``schedule.lr``."""
        def inner(name: str) -> str:
            return f"{section}.{name}"

        problem = self.problem
        for name in self.related:
            problem = _replace_setting(problem, name, inner(name))
        return SettingError(inner(self.setting), problem, [inner(r) for r in self.related])

    def as_flags(self) -> str:
        """The message with each setting spelled as its command-line flag."""
        problem = self.problem
        for name in self.related:
            problem = _replace_setting(problem, name, flag_name(name))
        return f"{flag_name(self.setting)} {problem}"


def _replace_setting(text: str, name: str, new: str) -> str:
    """``name`` as a whole setting name in ``text`` (not inside ``finetune_scope`` or ``finetunes``)."""
    return re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", new.replace("\\", "\\\\"), text)


def flag_name(setting: str) -> str:
    """``schedule.micro_batch_size`` → ``--schedule.micro-batch-size``."""
    return "--" + setting.replace("_", "-")


def is_section(tp: Any) -> bool:
    """Whether a field's type is a dataclass embedded whole (a section)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the field's declared type."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    if origin in (list, Sequence, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def load_yaml(cls: type[C], path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of overrides for ``cls``; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return _read_mapping(cls, data, f"{path}: ")


def _read_mapping(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data``'s values checked against ``cls``'s fields; a section's mapping recursively."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{where}unknown key '{key}' for {cls.__name__}{_hint(cls, name)}")
        if is_section(types_[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a mapping of {types_[name].__name__} keys, "
                                  f"got {type(value).__name__}")
            out[name] = _read_mapping(types_[name], value, f"{where}{key}.")
        else:
            out[name] = _coerce(value, types_[name], f"{where}{key}")
    return out


def _hint(cls: type, name: str) -> str:
    """``; did you mean ...?``: close field names, or the section that holds ``name``."""
    types_ = _field_types(cls)
    homes = [f"{k}.{name}" for k, tp in types_.items() if is_section(tp) and name in _field_types(tp)]
    close = homes or difflib.get_close_matches(name, list(types_), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            shown: Mapping[str, Any] | None = None) -> None:
    """Add ``--config``, ``--print-config`` and one flag per dataclass field (values are resolved
    later; ``shown``: values read from ``--preset``/``--config`` that ``--help`` shows as defaults)."""
    parser.add_argument(
        "--config", metavar="YAML", default=None,
        help="YAML file of config values; explicit flags override it",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (defaults < --preset < --config < flags) as YAML that "
             "--config reads back, and exit without running anything")
    _add_fields(parser, cls, "", None, shown or {})


def _add_fields(parser: Any, cls: type, prefix: str, defaults: Any, shown: Mapping[str, Any]) -> None:
    """One flag per field of ``cls`` (``prefix``: ``"section."``); a section gets a group of its own.
    ``defaults``: the instance whose values ``--help`` shows (a section's default in its job);
    ``shown``: values that replace them (a preset's, a ``--config`` file's)."""
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(types_[f.name])
        default = getattr(defaults, f.name) if defaults is not None else field_default(f)
        if is_section(tp):
            title = f"{f.name} (--{f.name}.*)"
            group = parser.add_argument_group(title, f.metadata.get("help") or (tp.__doc__ or "").strip() or None)
            _add_fields(group, tp, f"{prefix}{f.name}.", default, dict(shown.get(f.name) or {}))
            continue
        default = shown.get(f.name, default)
        flag = flag_name(prefix + f.name)
        help_ = f.metadata.get("help", "")
        if default is not None:
            help_ = f"{help_} (default: {default!r})" if help_ else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": help_}
        metavar = f.metadata.get("metavar", f.name.upper())
        if "choices" in f.metadata:  # --help shows them: {a,b,c} in place of a metavar
            kwargs["choices"] = list(f.metadata["choices"])
            metavar = f.metadata.get("metavar")
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, Sequence, tuple):
            (item_tp,) = typing.get_args(tp)[:1] or (str,)
            kwargs.update(nargs="+", type=item_tp, metavar=metavar)
            if f.metadata.get("repeatable"):  # `--x A --x B` accumulates (otherwise the last one wins)
                kwargs["action"] = "extend"
        else:
            kwargs.update(type=tp, metavar=metavar)
        parser.add_argument(*f.metadata.get("aliases", ()), flag, **kwargs)  # aliases: e.g. --from


def find_presets(config_dir: str | Path, job: str) -> dict[str, Path]:
    """``{preset: path}`` for the files ``<config_dir>/<job>_<preset>.yaml``."""
    return {p.stem[len(job) + 1:]: p for p in sorted(Path(config_dir).glob(f"{job}_*.yaml"))}


def build_parser(cls: type, *, prog: str, description: str, epilog: str = "",
                 presets: Mapping[str, Path] | None = None,
                 argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """An argument parser with ``--preset`` (when ``presets``), ``--config``, ``--print-config`` and
    one flag per field. With ``argv`` asking for ``--help``, the defaults it shows are those of the
    ``--preset`` and ``--config`` named in ``argv`` (and its header says whose they are)."""
    shown, sources = _help_values(cls, argv, presets)
    if sources:
        description = (f"Defaults shown are the values of {' and '.join(sources)} "
                       f"(over the code's defaults).\n\n{description}")
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a shipped config (YAML); --config and explicit flags override it")
    add_dataclass_arguments(parser, cls, shown)
    return parser


def _last_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` / ``flag=VALUE`` in ``argv`` (before ``--``)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _help_values(cls: type, argv: Sequence[str] | None,
                 presets: Mapping[str, Path] | None) -> tuple[dict[str, Any], list[str]]:
    """``(values, sources)``: what ``--preset``/``--config`` in ``argv`` set, for ``--help`` only
    (a file that cannot be read is left to the run to report)."""
    argv = list(argv or ())
    values: dict[str, Any] = {}
    sources: list[str] = []
    if not {"-h", "--help"} & set(argv[: argv.index("--")] if "--" in argv else argv):
        return values, sources
    preset, config = _last_value(argv, "--preset"), _last_value(argv, "--config")
    shipped = (presets or {}).get(preset or "")
    for label, path in ((f"--preset {preset} ({getattr(shipped, 'name', '')})", shipped),
                        (f"--config {config}", config)):
        try:
            merge(values, load_yaml(cls, path)) if path else None
            sources += [label] if path else []
        except ConfigError:
            pass
    return values, sources


def config_from_args(cls: type[C], args: argparse.Namespace,
                     presets: Mapping[str, Path] | None = None) -> C:
    """defaults < ``--preset`` YAML < ``--config`` YAML < flags given on the command line."""
    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if preset:
        if not presets or preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(presets or {})}")
        merge(values, load_yaml(cls, presets[preset]))
    if getattr(args, "config", None):
        merge(values, load_yaml(cls, args.config))
    flags: dict[str, Any] = {}
    for dest, value in vars(args).items():  # "schedule.lr" → {"schedule": {"lr": ...}}
        *sections, name = dest.split(".")
        node = flags
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    merge(values, _read_known(cls, flags))
    return build(cls, values)


def _read_known(cls: type, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed flags that are ``cls``'s fields (argparse also holds ``--preset``, ``--config``, ...)."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    for name, value in flags.items():
        if name in types_:
            out[name] = _read_known(types_[name], value) if is_section(types_[name]) else value
    return out


def merge(into: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``into`` updated by ``values``, a section's keys one by one (later sources win per field)."""
    for k, v in values.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = dict(v) if isinstance(v, Mapping) else v
    return into


def build(cls: type[C], values: Mapping[str, Any]) -> C:
    """``cls(**values)`` where a section's values replace those of the field's default instance.
    A section's :class:`SettingError` comes out naming the setting inside its section."""
    types_ = _field_types(cls)
    kwargs = dict(values)
    for f in dataclasses.fields(cls):
        if is_section(types_[f.name]) and isinstance(kwargs.get(f.name), Mapping):
            try:
                kwargs[f.name] = dataclasses.replace(field_default(f), **kwargs[f.name])
            except SettingError as e:
                raise e.within(f.name) from None
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the resolved config, for writing next to results (a section: a dict)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML that ``--config`` reads back to the same config (``--print-config``)."""
    def plain(v: Any) -> Any:  # tuples as lists: safe_dump writes no tuples
        return ({k: plain(x) for k, x in v.items()} if isinstance(v, Mapping)
                else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v)

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False, default_flow_style=False)


def resolve_and_run(cls: type[C], args: argparse.Namespace, presets: Mapping[str, Path] | None,
                    body: Callable[[C], Optional[int]]) -> Optional[int]:
    """:func:`config_from_args`, then ``body(config)``; ``--print-config``: print it (YAML) instead."""
    cfg = config_from_args(cls, args, presets)
    if getattr(args, "print_config", False):
        print(config_yaml(cfg), end="")
        return 0
    return body(cfg)


def key_values(cfg: Any, *, marker: str | None = "key", flat_sections: bool = False) -> dict[str, Any]:
    """What defines a job's result: the values of ``cfg``'s fields marked ``metadata={marker: True}``
    (``marker=None``: every field). A section contributes its own defining fields, those it marks
    ``"key"`` (all of them when it marks none, as a training recipe), named ``section.field``, or
    by their bare names with ``flat_sections``. Derived from the dataclasses: a new field of a
    recipe is in every key at once."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if marker is not None and not f.metadata.get(marker):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            marked = any(g.metadata.get("key") for g in dataclasses.fields(value))
            inner = key_values(value, marker="key" if marked and marker is not None else None)
            out.update({("" if flat_sections else f"{f.name}.") + k: v for k, v in inner.items()})
        else:
            out[f.name] = value
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"schedule": {"lr": 1}}`` → ``{"schedule.lr": 1}``: one level, for trackers' parameters."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: Exceptions that mean "the input is wrong", not "the program is": one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def run_main(fn: Callable[[], Optional[int]], *,
             explain: Callable[[BaseException], Optional[tuple[int, str]]] | None = None,
             user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run a command's body and turn its failure into an exit status.

    ``fn()`` returns the exit status (``None`` = 0). ``explain(e)`` may claim an exception first
    and return ``(status, message)`` (e.g. a training run that failed beyond its retries); then
    any of ``user_errors`` (bad config, missing file, malformed data: ``ValueError``,
    ``OSError``, ``ImportError``) prints ``error: <message>`` to stderr and returns 2; anything
    else is a bug and propagates with its traceback. Ctrl-C (``KeyboardInterrupt``) returns 130
    with one line instead of a traceback: the body's ``with`` blocks have run by then (output
    locks released, temporary files removed), and what it finished stays for a rerun.
    """
    try:
        return int(fn() or 0)
    except BrokenPipeError:  # stdout closed early (`| head`): the entry point ends quietly
        raise
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); what finished before is kept and the same command resumes from it",
              file=sys.stderr)
        return 130
    except Exception as e:
        claimed = explain(e) if explain is not None else None
        if claimed is not None:
            status, message = claimed
            print(f"error: {message}", file=sys.stderr)
            return status
        if isinstance(e, SettingError):  # the library names the setting; the command line knows it as a flag
            print(f"error: {e.as_flags()}", file=sys.stderr)
            return 2
        if isinstance(e, user_errors):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


# --- option groups shared by several jobs ----------------------------------------------------

@dataclasses.dataclass
class CacheOptions:
    """Where BIG-Bench, the embedded generator and the pretrained scorer are cached."""

    cache_dir: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "cache for BIG-Bench, the embedded generator and the pretrained scorer "
                "(default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})
