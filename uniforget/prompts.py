"""Neutral prompts for mask learning: the only data UniForget ever sees (nothing memorized is named).

Resolution order: an explicit `--prompts FILE`; else the toy's own training prompts
(`uniforget/toy/prompts_train.txt`, disjoint from its evaluation captions) when the model is the toy;
else the shipped generic list `uniforget/data/neutral_prompts.txt` (copyright-free scenes, no names of
people, artists, brands or characters). Files: one prompt per line; blank lines and `#` comments skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import UniforgetError
from .models import TOY_DIR

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "neutral_prompts.txt"
TOY_PROMPTS = TOY_DIR.parent / "prompts_train.txt"


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a UTF-8 text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise UniforgetError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UniforgetError(f"{path} is not UTF-8 text: {e}") from e
    prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise UniforgetError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def default_prompt_file(model: str | None) -> Path:
    """The toy's own neutral training prompts for the toy, else the shipped generic list."""
    if model is None or str(model) == "toy":
        if not TOY_PROMPTS.is_file():  # the generic list's words are outside the toy's vocabulary
            raise UniforgetError(f"the toy's neutral training prompts are missing ({TOY_PROMPTS}); "
                                 "pass --prompts FILE")
        return TOY_PROMPTS
    return DEFAULT_PROMPTS


def load_prompts(path: str | Path | None = None, model: str | None = None) -> list[str]:
    """The neutral prompts to learn from (see the module docstring for which file is used)."""
    src = Path(path) if path is not None else default_prompt_file(model)
    prompts = read_prompt_file(src)
    log.info("neutral prompts: %d from %s", len(prompts), src)
    return prompts
