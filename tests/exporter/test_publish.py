"""Publishing a finished folder: it must be as readable as one made with mkdir, not mkdtemp's 0700."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from exporter.publish import publish_dir


def test_published_folder_has_mkdir_permissions(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix=".out.partial-", dir=tmp_path))
    (tmp / "model.onnx").write_bytes(b"x")
    (tmp_path / "reference").mkdir()
    out = tmp_path / "out"
    publish_dir(tmp, out)
    assert out.stat().st_mode & 0o777 == (tmp_path / "reference").stat().st_mode & 0o777


def test_republish_replaces_and_keeps_permissions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    tmp = Path(tempfile.mkdtemp(prefix=".out.partial-", dir=tmp_path))
    (tmp / "new.txt").write_text("new")
    os.chmod(out, 0o755)
    publish_dir(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
