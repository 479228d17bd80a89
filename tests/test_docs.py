"""The documents' commands and snippets run as written, so the documentation cannot rot.

Every fenced ```python block of README.md and docs/walkthrough.md runs in a fresh namespace, every ```bash block in
bash (`-e`: the first failing command fails the test), each from an empty scratch folder. A block right after an HTML
comment `<!-- not run: REASON -->` is skipped: the long jobs, the installs, commands with placeholders. Blocks that
use a real model (`model_dir`, `default_model_dir`) are marked slow: the first one fetches the model.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

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


def runnable() -> list:
    params = []
    for document in DOCUMENTS:
        for language, line, code, skipped in blocks(document):
            if language not in ("python", "bash") or skipped:
                continue
            marks = [pytest.mark.slow] if "model_dir(" in code else []
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
