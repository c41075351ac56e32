"""Job configs: dataclasses loadable from YAML and overridable from the command line.

Precedence is defaults < ``--config FILE.yaml`` < explicit CLI flags. Unknown YAML keys are an
error that names the file and the key, so a typo never silently falls back to a default.

Each field becomes a flag ``--field-name``; ``metadata={"help": ...}`` on the field becomes its
``--help`` text (``"metavar"``, ``"choices"`` and, for a list, ``"repeatable": True`` are
honoured too). Supported field types: str, int, float, bool (``--x/--no-x``), Optional of
those, and ``list[str]`` / ``list[int]`` / ``list[float]`` (``nargs='+'``).

One mechanism for every command: :func:`build_parser` (flags from the dataclass, plus
``--preset NAME`` when the job ships presets, i.e. YAML files), :func:`config_from_args`
(defaults < ``--preset`` < ``--config`` < flags) and :func:`run_main` (bad input → one
``error:`` line and exit status 2, no traceback). Option groups repeated across jobs are small
dataclasses (:class:`CacheOptions`) that job configs inherit.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and field."""


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
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}' for {cls.__name__}{hint}")
        out[name] = _coerce(value, types_[name], f"{path}: {key}")
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per dataclass field (defaults are resolved later)."""
    parser.add_argument(
        "--config", metavar="YAML", default=None,
        help="YAML file of config values; explicit flags override it",
    )
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(types_[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        if default is not None:
            help_ = f"{help_} (default: {default!r})" if help_ else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, Sequence, tuple):
            (item_tp,) = typing.get_args(tp)[:1] or (str,)
            kwargs.update(nargs="+", type=item_tp, metavar=f.metadata.get("metavar", f.name.upper()))
            if f.metadata.get("repeatable"):  # `--x A --x B` accumulates (otherwise the last one wins)
                kwargs["action"] = "extend"
        else:
            kwargs.update(type=tp, metavar=f.metadata.get("metavar", f.name.upper()))
        parser.add_argument(*f.metadata.get("aliases", ()), flag, **kwargs)  # aliases: e.g. --from


def find_presets(config_dir: str | Path, job: str) -> dict[str, Path]:
    """``{preset: path}`` for the files ``<config_dir>/<job>_<preset>.yaml``."""
    return {p.stem[len(job) + 1:]: p for p in sorted(Path(config_dir).glob(f"{job}_*.yaml"))}


def build_parser(cls: type, *, prog: str, description: str, epilog: str = "",
                 presets: Mapping[str, Path] | None = None) -> argparse.ArgumentParser:
    """An argument parser with ``--preset`` (when ``presets``), ``--config`` and one flag per field."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a shipped config (YAML); --config and explicit flags override it")
    add_dataclass_arguments(parser, cls)
    return parser


def config_from_args(cls: type[C], args: argparse.Namespace,
                     presets: Mapping[str, Path] | None = None) -> C:
    """defaults < ``--preset`` YAML < ``--config`` YAML < flags given on the command line."""
    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if preset:
        if not presets or preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(presets or {})}")
        values.update(load_yaml(cls, presets[preset]))
    if getattr(args, "config", None):
        values.update(load_yaml(cls, args.config))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the resolved config, for writing next to results."""
    return dataclasses.asdict(cfg)


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
