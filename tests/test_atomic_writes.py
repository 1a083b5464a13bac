"""Failure injection for ``fileio.atomic_write``: a writer that fails midway, or a rename that
fails, must leave the target as it was (old content, or absent) and no temporary file behind."""

import json
import os
import stat

import pytest

from ntrk_lightning import fileio
from ntrk_lightning.fileio import atomic_write, atomic_write_json, atomic_write_text

pytestmark = pytest.mark.core


class Boom(Exception):
    pass


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _half_then_fail(tmp):
    with open(tmp, "w") as f:
        f.write('{"half": ')
        f.flush()
    raise Boom("disk full")


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_writer_failing_midway_keeps_the_old_file(tmp_path, exc):
    target = tmp_path / "out.json"
    target.write_text('{"old": true}\n')

    def writer(tmp):
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise exc()

    with pytest.raises(exc):
        atomic_write(target, writer)
    assert target.read_text() == '{"old": true}\n'
    assert _leftovers(tmp_path) == []


def test_writer_failing_midway_leaves_no_target(tmp_path):
    target = tmp_path / "deep" / "er" / "out.json"
    with pytest.raises(Boom):
        atomic_write(target, _half_then_fail)
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def no_replace(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(fileio.os, "replace", no_replace)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_the_target_never_holds_a_partial_file_while_writing(tmp_path):
    """While the writer runs, the target still holds the old content (the new bytes go elsewhere)."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    seen = []

    def writer(tmp):
        with open(tmp, "w") as f:
            f.write("new, first half")
            f.flush()
            seen.append(target.read_text())
            f.write(" and second half")

    atomic_write(target, writer)
    assert seen == ["old"] and target.read_text() == "new, first half and second half"
    assert _leftovers(tmp_path) == []


def test_success_gives_the_permissions_open_would(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "sub" / "m.json", {"a": float("nan"), "b": [1.5, float("inf")]})
    finally:
        os.umask(mask)
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _leftovers(path.parent) == []
