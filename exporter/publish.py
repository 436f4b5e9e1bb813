"""Publishing a finished output folder: every stage writes into a temporary sibling and renames it into place;
and refusing, before any work, an output path that could never be created or an input file that is not one."""

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


def check_can_create(out: Path, option: str = "--out", *, replace: bool = True, flag: str = "--overwrite") -> None:
    """Refuse, before any work, an output folder that cannot be created: a path that is a file, an existing
    folder when `replace` is false (`flag` not given), an ancestor that is a file, or a folder where nothing can
    be written (read-only, /proc, no permission)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{option} {out} is a file, not a folder; choose another {option}")
    if out.exists() and not replace:
        raise ExportError(f"{option} {out} already exists; pass {flag} to replace it or choose another {option}")
    _probe_ancestor(out, option)


def check_can_write_file(out: Path, option: str = "--out", *, replace: bool = True) -> None:
    """Refuse, before any work, an output file that cannot be written: a path that is a folder, an existing file
    when `replace` is false (the option's --overwrite not given), or a place where nothing can be written."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{option} {out} is a folder; give a file path")
    if out.exists() and not replace:
        raise ExportError(f"{option} {out} already exists; pass --overwrite to replace it")
    _probe_ancestor(out, option)


def _probe_ancestor(out: Path, option: str) -> None:
    """The nearest existing ancestor must be a folder where something can be created. It is probed by creating
    and removing an empty temporary folder there, because os.access says yes to root everywhere."""
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


def check_input_file(path: Path | str, option: str, *, safetensors: bool = False) -> Path:
    """Refuse, before a model is loaded, an input that is missing, a folder, or (safetensors=True) not a
    readable .safetensors file; only its header is read."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{option} {path} is a folder; give a file")
    if not path.is_file():
        raise ExportError(f"{option} file not found: {path}")
    if safetensors:
        from uniforget.errors import ModelLoadError
        from uniforget.safetensors_header import read_safetensors_header

        try:
            read_safetensors_header(path)
        except ModelLoadError as e:
            raise ExportError(f"{option}: {e}") from None
    return path


def check_prompts_file(path: Path | str, option: str = "--prompts") -> None:
    """A neutral-prompts file (one per line) that exists, is UTF-8 text and holds at least one prompt."""
    from uniforget.errors import UniforgetError
    from uniforget.prompts import read_prompt_file

    check_input_file(path, option)
    try:
        read_prompt_file(path)
    except UniforgetError as e:
        raise ExportError(f"{option}: {e}") from None


def check_model(model: str | None, option: str = "--model") -> None:
    """'toy' or a path that exists (a pipeline folder or a checkpoint file); what it holds is checked on load."""
    from uniforget.models import resolve_model_path

    path = Path(resolve_model_path(model))
    if not path.exists():
        hint = (" (the embedded toy is not installed in this checkout: train it with scripts/train_toy.py)"
                if model in ("toy", None) else "")
        raise ExportError(f"{option} not found: {path}{hint}")


def check_eval_prompts_file(path: Path | str, option: str) -> None:
    """An evaluation-prompts JSON file (uniforget.eval_prompts) that parses and whose images exist."""
    from uniforget.errors import UniforgetError
    from uniforget.eval_prompts import read_eval_prompts

    try:
        read_eval_prompts(path)
    except UniforgetError as e:
        raise ExportError(f"{option}: {e}") from None


def check_slim_folder(path: Path | str, option: str) -> None:
    """A slim UNet folder as `uniforget prune --out` writes it (its plan file is the mark); the weights are
    checked when it loads."""
    if not (Path(path) / "uniforget_plan.json").is_file():
        raise ExportError(f"{option} {path} is not a slim UNet folder (no uniforget_plan.json; "
                          "`uniforget prune --out` writes one)")
