"""Publishing a finished output folder: every stage writes into a temporary sibling and renames it into place;
and refusing, before any work, an output path that could never be created."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import ExportError


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`; an existing `out` is swapped out first, then removed.

    `tmp` comes from mkdtemp (0700): it gets the permissions of a folder made with mkdir, so a server running
    as another user (Triton's container) can read the published files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_can_create(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be created: an ancestor that is a file, or a folder
    where nothing can be written (read-only, /proc, no permission). The nearest existing ancestor is probed by
    creating and removing an empty temporary folder there, because os.access says yes to root everywhere."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{option} {out} is a file, not a folder; choose another {option}")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ExportError(f"cannot create {option} {out}: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".uniforget-probe-", dir=anc))
    except OSError as e:
        raise ExportError(f"cannot create {option} {out}: nothing can be written in {anc} "
                          f"({e.strerror or e}); choose another {option}") from None
