"""The error hierarchy: every user-facing failure is one of these, so the CLI can print one line and exit 2."""

import sys
from collections.abc import Callable
from typing import NoReturn


class UniforgetError(Exception):
    """Base for every error the tool raises on purpose (bad input, failed gate, missing dependency)."""


class ModelLoadError(UniforgetError):
    """A model path or checkpoint could not be loaded as a Stable Diffusion pipeline."""


class MaskSetError(UniforgetError):
    """A MaskSet file is unreadable, malformed, or belongs to another model."""


class PlanError(UniforgetError):
    """A pruning plan cannot be made or applied (bad ratio, corrupt plan, mismatched model)."""


class ParityError(UniforgetError):
    """Two stages that must compute the same thing do not, within tolerance."""


def run_script(main: Callable[[], int]) -> NoReturn:
    """Exit with `main()`'s status; one of our errors becomes a single `error:` line and status 2, like the CLI."""
    try:
        status = main()
    except UniforgetError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)
