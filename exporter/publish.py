"""Publishing a finished output folder: every stage writes into a temporary sibling and renames it into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` folder to `out`; an existing `out` is swapped out first, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
