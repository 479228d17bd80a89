"""ecellm.files: a folder written all at once, JSON read with errors that name the file, symbolic links refused."""

import pytest

from ecellm.files import LinkRefused, open_to_append, read_json, write_dir_atomically, write_json
from ecellm.models.config import ConfigError


def test_a_folder_appears_complete_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "ckpt"
    write_dir_atomically(final, lambda tmp: (tmp / "a.txt").write_text("1"))
    write_dir_atomically(final, lambda tmp: (tmp / "b.txt").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left beside it
    assert final.stat().st_mode & 0o777 == 0o755


def test_a_failed_write_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    final = tmp_path / "ckpt"
    write_dir_atomically(final, lambda tmp: (tmp / "a.txt").write_text("1"))

    def crash(tmp):
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomically(final, crash)
    assert [p.name for p in final.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_read_json_names_the_file_and_raises_the_callers_error(tmp_path):
    write_json(tmp_path / "ok.json", {"a": [1, 2]})
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    assert (tmp_path / "ok.json").read_text().endswith("}\n")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json", ConfigError)
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="latin1.json: not valid JSON"):
        read_json(tmp_path / "latin1.json")


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path):
    write_json(tmp_path / "summary.json", {"loss": float("nan"), "best": float("inf"), "steps": 3}, strict=True)
    assert read_json(tmp_path / "summary.json") == {"loss": None, "best": None, "steps": 3}
    assert "NaN" not in (tmp_path / "summary.json").read_text()
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(tmp_path / "nested.json", {"losses": [float("nan")]}, strict=True)


def test_appending_refuses_a_symbolic_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "log.jsonl").symlink_to(victim)
    with pytest.raises(LinkRefused, match=r"log.jsonl is a symbolic link"):
        open_to_append(tmp_path / "log.jsonl")
    with open_to_append(tmp_path / "new.jsonl") as f:
        f.write("{}\n")
    assert victim.read_text() == "keep me" and (tmp_path / "new.jsonl").read_text() == "{}\n"

