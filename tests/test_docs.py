"""The documents' commands and snippets run as written, so the documentation cannot rot.

Every fenced ```python block of README.md and docs/walkthrough.md runs in a fresh namespace, every ```bash block in
bash (`-e`: the first failing command fails the test), each from an empty scratch folder. A block right after an HTML
comment `<!-- not run: REASON -->` is skipped: the long jobs, the installs, commands with placeholders. Blocks that
use a real model (`model_dir(`, or a known model's name such as "smollm2") are marked slow: the first one fetches it.
The python blocks without a real model run once more from a non-editable install, outside the repository, as a user
runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ecellm.models.default import MODELS

from .tiny_checkpoint import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/walkthrough.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: [^>]+ -->\s*$")


def blocks(document: str) -> list[tuple[str, int, str, bool]]:
    """(language, line, code, skipped) of each fenced block of `document`, in order."""
    text = (ROOT / document).read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        skipped = NOT_RUN.search(text[: m.start()].rstrip("\n") + "\n") is not None
        found.append((m.group(1), line, m.group(2), skipped))
    return found


def uses_real_model(code: str) -> bool:
    """Whether a block loads real weights: by `model_dir(...)` or by a known model's quoted name."""
    return "model_dir(" in code or any(f'"{name}"' in code for name in MODELS)


def runnable() -> list:
    params = []
    for document in DOCUMENTS:
        for language, line, code, skipped in blocks(document):
            if language not in ("python", "bash") or skipped:
                continue
            marks = [pytest.mark.slow] if uses_real_model(code) else []
            params.append(pytest.param(language, code, id=f"{document}:{line}", marks=marks))
    return params


@pytest.mark.parametrize("language, code", runnable())
def test_snippet_runs(language, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands in the scratch folder
    if language == "python":
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
        return
    result = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documents_have_snippets_and_skip_only_with_a_reason(document):
    found = blocks(document)
    assert sum(lang == "python" and not skipped for lang, _, _, skipped in found) >= 5, document
    for comment in re.findall(r"<!-- not run.*?-->", (ROOT / document).read_text(encoding="utf-8"), re.S):
        assert re.fullmatch(r"<!-- not run: [^>]+ -->", comment), f"{document}: {comment!r} needs a reason"


def test_relative_links_point_to_files():
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8")):
            assert (document.parent / target).exists(), f"{document.relative_to(ROOT)}: broken link {target}"


def python_blocks(document: str, real_model: bool) -> list[str]:
    """The run python blocks of `document` that use a real model (`real_model`) or do not."""
    return [code for lang, _, code, skipped in blocks(document)
            if lang == "python" and not skipped and uses_real_model(code) == real_model]


def test_readme_is_short_and_names_the_quick_tests_first():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 220
    commands = [line.split("#")[0].strip() for line in re.findall(r"^python -m pytest.*$", text, re.M)]
    assert commands == ['python -m pytest -m "not slow"', "python -m pytest"]  # the quick check, then the full suite
    assert re.search(r"^python -m pytest$", (ROOT / ".ci/run").read_text(encoding="utf-8"), re.M)  # CI: the full one


def test_readme_training_snippet_changes_the_adapter(tmp_path, monkeypatch):
    """The snippet's run must take a step with a learning rate above 0 (the warmup's first step has none), so that
    its adapter is not the untouched B = 0 one. A tiny checkpoint stands in for the real model."""
    tiny = make_tiny_checkpoint(tmp_path / "tiny", tasks=("PM",))
    monkeypatch.chdir(tmp_path)
    (code,) = [code for code in python_blocks("README.md", real_model=True) if "TrainConfig(" in code]
    assert 'model="smollm2"' in code
    code = code.replace('model="smollm2"', f"model={str(tiny)!r}")
    namespace = {"__name__": "__snippet__"}
    exec(compile(code, "<README training snippet>", "exec"), namespace)
    adapter = load_file(Path(namespace["summary"]["adapter"]) / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b)


def test_walkthrough_llama2_token_ids_are_true():
    """Section 2 quotes Llama-2's ids for "yes" after a newline and alone; its snippet shows the effect with a tiny
    tokenizer, so the quoted ids are checked here against Llama-2's tokenizer file."""
    from ecellm.tokenizer import load_tokenizer

    text = (ROOT / "docs/walkthrough.md").read_text(encoding="utf-8")
    assert "id 3582 (`yes`)" in text and "4874" in text
    tokenizer = load_tokenizer(ROOT / "tests/assets/tokenizers/llama2-spm")
    assert tokenizer.encode("### Response:\nyes", bos=False)[-1] == 3582
    assert tokenizer.encode("yes", bos=False) == [4874]


RUN_INSTALLED = """
import json, os, sys, tempfile
from pathlib import Path
import ecellm
site = Path(sys.argv[1]).resolve()
assert Path(ecellm.__file__).resolve().is_relative_to(site), f"ecellm imported from {ecellm.__file__}, not {site}"
for i, code in enumerate(json.loads(Path(sys.argv[2]).read_text())):
    os.chdir(tempfile.mkdtemp())
    try:
        exec(compile(code, f"<snippet {i}>", "exec"), {"__name__": "__snippet__"})
    except Exception:
        print(f"snippet {i} failed:\\n{code}", file=sys.stderr)
        raise
"""


@pytest.mark.slow
def test_snippets_run_from_an_installed_package(tmp_path):
    """A user's install has no tests/ or repository beside the package: build a non-editable install from the
    package's own files (copied, so the build writes nothing into the repository), then run every python block that
    needs no real model with only that install on the path, from a folder outside the repository."""
    source, site, cwd = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "ecellm", source / "ecellm", ignore=shutil.ignore_patterns("__pycache__"))
    for file in ROOT.iterdir():  # setup.py, README.md, any pyproject.toml or MANIFEST.in
        if file.is_file():
            shutil.copy(file, source / file.name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(source)], check=True, timeout=300,
                   env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    snippets = tmp_path / "snippets.json"
    snippets.write_text(json.dumps([code for document in DOCUMENTS for code in python_blocks(document, False)]))
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", RUN_INSTALLED, str(site), str(snippets)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_page_shows_every_subcommand_and_names_real_configs():
    import importlib

    from ecellm.cli import COMMANDS

    (example,) = [code for lang, _, code, _ in blocks("docs/cli.md") if lang == "bash"]
    shown = {line.split()[1] for line in example.splitlines() if line.startswith("ecellm ")}
    assert shown == set(COMMANDS)
    for name, module in re.findall(r"# (\w+Config) \(([\w.]+)\)", example):
        assert hasattr(importlib.import_module(module), name), f"docs/cli.md: no {name} in {module}"
