"""``mpo.fsio``: folders replaced without touching the user's other folders, files with the modes open() gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mpo import fsio
from mpo.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    replace_dir,
    replaceable_dir,
    staged_dir,
)


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    """A umask that no test machine has by default, so a mode derived from it cannot match by chance."""
    old = os.umask(0o027)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------------------------------------------
# replace_dir


def test_replace_dir_leaves_a_folder_named_like_the_old_copy_alone(tmp_path):
    """The old folder used to be renamed to the fixed name ``.NAME.old``, deleting a user's folder of that name."""
    mine = _folder(tmp_path / ".mydata.old", **{"keep.txt": "keep me"})
    _folder(tmp_path / "mydata", **{"a.txt": "old"})
    replace_dir(_folder(tmp_path / "new", **{"b.txt": "new"}), tmp_path / "mydata")
    assert _tree(tmp_path / "mydata") == {"b.txt": "new"}
    assert _tree(mine) == {"keep.txt": "keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mydata.old", "mydata"]  # no debris


def test_replace_dir_replaces_a_link_itself_and_never_its_target(tmp_path):
    """``rmtree`` of the moved-away link used to fail and leave ``.link.old`` behind, failing every later run."""
    target = _folder(tmp_path / "target", **{"a.txt": "old"})
    (tmp_path / "link").symlink_to(target)
    replace_dir(_folder(tmp_path / "new", **{"b.txt": "new"}), tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and _tree(tmp_path / "link") == {"b.txt": "new"}
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    _folder(tmp_path / "out", **{"a.txt": "old"})
    new = _folder(tmp_path / "new", **{"b.txt": "new"})
    rename = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(fsio.os, "replace", failing)
    with pytest.raises(OSError, match="No space left on device"):
        replace_dir(new, tmp_path / "out")
    assert _tree(tmp_path / "out") == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_replace_dir_refuses_a_file(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(NotADirectoryError, match=r"afile: exists and is not a folder; refusing to replace it$"):
        replace_dir(_folder(tmp_path / "new"), tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------
# replaceable_dir, staged_dir


def test_replaceable_dir_follows_links(tmp_path):
    target = _folder(tmp_path / "target")
    (tmp_path / "link").symlink_to(target)
    assert replaceable_dir(tmp_path / "link") == target.resolve()
    assert replaceable_dir(tmp_path / "new" / "sub") == (tmp_path / "new" / "sub").resolve()


@pytest.mark.parametrize(("path", "message"), [
    ("afile", "afile: exists and is not a folder; choose another path"),
    ("afile/sub", "afile/sub: {tmp}/afile is not a folder; choose another path"),
])
def test_replaceable_dir_refuses_a_file(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(NotADirectoryError) as err:
        replaceable_dir(path)
    assert str(err.value) == message.format(tmp=tmp_path.resolve())


@pytest.mark.parametrize("path", [".", "..", "sub/..", "/"])
def test_replaceable_dir_refuses_the_current_folder_and_those_above(tmp_path, monkeypatch, path):
    """``Path(".").name`` is empty, so replacing it used to fail with ``PosixPath('.') has an empty name``."""
    monkeypatch.chdir(_folder(tmp_path / "work"))
    with pytest.raises(FileExistsError) as err:
        replaceable_dir(path)
    assert str(err.value) == f"{path}: is the current folder or one above it; name a new folder instead"


def test_staged_dir_replaces_on_success_and_cleans_up_on_failure(tmp_path, umask_027):
    out = _folder(tmp_path / "out", **{"a.txt": "old"})
    with pytest.raises(RuntimeError, match="build failed"), staged_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("build failed")
    assert _tree(out) == {"a.txt": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _tree(out) == {"b.txt": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _mode(out) == 0o750  # what mkdir gives under umask 027, not mkdtemp's 0700


# ----------------------------------------------------------------------------------------------------------------
# file modes

WRITERS = {
    "bytes": lambda p: atomic_write_bytes(p, b"x"),
    "text": lambda p: atomic_write_text(p, "x"),
    "json": lambda p: atomic_write_json(p, {"x": 1}),
    "jsonl": lambda p: atomic_write_jsonl(p, [{"x": 1}]),
}


@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
def test_a_new_file_gets_the_mode_open_gives(tmp_path, umask_027, write):
    """mkstemp makes 0600: a run's config.yaml was private while its metrics.jsonl (open()) was not."""
    write(tmp_path / "f")
    (tmp_path / "g").write_text("")
    assert _mode(tmp_path / "f") == _mode(tmp_path / "g") == 0o640


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, umask_027, mode):
    path = tmp_path / "f.json"
    path.write_text("{}")
    path.chmod(mode)
    atomic_write_json(path, {"x": 1})
    assert _mode(path) == mode and path.read_text() == '{\n  "x": 1\n}\n'


def test_umask_is_read_without_proc_too(monkeypatch, umask_027):
    assert fsio._umask() == 0o027

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(fsio, "open", no_proc, raising=False)  # the module's name `open` shadows the builtin
    assert fsio._umask() == 0o027
    assert os.umask(0o027) == 0o027  # the fallback put the umask back
