"""Console entry points: `uniforget <stage>` and the one-shot `uniforget-export`.

Parse -> library call -> exit code. Any tool error becomes one line on stderr and exit code 2;
Ctrl-C exits 130. Logging goes through rich; the library itself only logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from uniforget.errors import UniforgetError

from .commands import STAGE_HELP, STAGES

log = logging.getLogger("uniforget")


_NUMBER = re.compile(r"-\d*\.?\d+(e[-+]?\d+)?", re.IGNORECASE)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage mistakes end like every other refusal: one line `error: ...`, exit code 2.

    argparse reports missing required options before unknown ones, so `uniforget plan --frob` would answer
    "--masks, --ratio are required" and hide the typo; this parser names the unknown option first."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            unknown = self._unknown_options()
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def _unknown_options(self) -> list[str]:
        """The words of this parser's command line that look like options it does not have."""
        known = self._option_string_actions
        unknown = []
        for word in getattr(self, "_words", []):
            if word == "--":
                break
            if not word.startswith("-") or word == "-" or _NUMBER.fullmatch(word):
                continue
            name = word.split("=", 1)[0]
            prefix_of = [k for k in known if k.startswith(name)] if self.allow_abbrev and name.startswith("--") else []
            if name not in known and len(prefix_of) != 1:
                unknown.append(word)
        return unknown


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("diffusers", "onnx", "onnxruntime", "polygraphy", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose <= 1:
        quiet_library_warnings()
    else:
        _drop_empty_fp32_notes()


def quiet_library_warnings() -> None:
    """Silence the libraries' notes that are not the user's business (transformers' optional-backend
    warnings, diffusers' empty keep-in-fp32 list); errors stay visible. The CLI calls it unless -vv; the
    scripts in scripts/ call it too, so a study's log is its own."""
    _quiet_transformers()
    _drop_empty_fp32_notes()


def _drop_empty_fp32_notes() -> None:
    fp32_log = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in fp32_log.filters):
        fp32_log.addFilter(_EmptyFp32ListFilter())


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers warns "There are modules in UNet2DConditionModel that should be kept in float32: []" on every
    `.to(dtype)` of a model, also when that list is empty, i.e. when nothing needs keeping: not the user's
    business. A non-empty list still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_transformers() -> None:
    """transformers' warnings are about its own optional backends (e.g. "`CLIPImageProcessor` requires
    torchvision (not installed); falling back to ..." on every pipeline load), not the user's business; its
    errors stay visible (-vv shows the warnings again).

    transformers logs through its own handler on the "transformers" logger and sets that logger's level when it
    is first imported (from TRANSFORMERS_VERBOSITY), so both are set: the variable for a later import (an
    explicit user choice wins), the level for an import that already happened. Importing transformers here only
    to call set_verbosity_error() would cost a second on commands that never load a model.
    """
    if os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error") == "error" and "transformers" in sys.modules:
        logging.getLogger("transformers").setLevel(logging.ERROR)


def _load_stage(name: str):
    try:
        return importlib.import_module(f"exporter.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"exporter.commands.{name}":
            return None
        raise


def _not_available(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise UniforgetError(f"'uniforget {name}' is not available in this version yet")

    return run


def add_single_file_options(p: argparse.ArgumentParser) -> None:
    """Overrides for single-file checkpoints (the shipped configs are the default): every stage sees them."""
    p.add_argument("--model-config", metavar="DIR", default=None,
                   help="diffusers pipeline folder whose configs a single-file --model loads with "
                        "(default: the configs shipped for its detected family)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="a single-file SD2.x model's prediction type when its file name cannot tell")


def apply_single_file_options(args: argparse.Namespace) -> None:
    if getattr(args, "model_config", None) or getattr(args, "prediction_type", None):
        from uniforget.models import set_single_file_defaults

        set_single_file_defaults(args.model_config, args.prediction_type)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `uniforget` parser. Only the stage `argv` names is imported (some stages import torch, ~3 s);
    the others are listed by their one-line help alone, so `uniforget --help` and the light stages (export,
    build, bench, serve) parse and refuse a bad option in a fraction of a second."""
    chosen = _stage_in(sys.argv[1:] if argv is None else argv)
    p = OneLineErrorParser(prog="uniforget", description="UniForget stages, one at a time.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_single_file_options(p)
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        mod = _load_stage(name) if name == chosen else None
        if name != chosen:  # listed for --help, never parsed
            sp = sub.add_parser(name, help=STAGE_HELP[name])
        elif mod is None:
            sp = sub.add_parser(name, help="(not available yet)")
            sp.set_defaults(func=_not_available(name))
        else:
            sp = mod.add_parser(sub)
            sp.set_defaults(func=mod.run)
        _add_logging_options(sp)
    return p


_TOP_OPTIONS_WITH_VALUE = ("--model-config", "--prediction-type")


def _stage_in(argv: Sequence[str]) -> str | None:
    """The stage a command line names: its first word that is not a top-level option or an option's value."""
    it = iter(argv)
    for word in it:
        if word in _TOP_OPTIONS_WITH_VALUE:
            next(it, None)
        elif not word.startswith("-"):
            return word if word in STAGES else None
    return None


def _add_logging_options(sp: argparse.ArgumentParser) -> None:
    """-v / -q after the stage name too (`uniforget plan -q ...`); given there, they win over the ones before it."""
    sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-vv for debug)")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (a scheduler or `kill`) unwinds like Ctrl-C, so every stage's cleanup runs and no temporary
    output is left looking like a finished one."""
    raise KeyboardInterrupt(f"signal {signum}")


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        apply_single_file_options(args)
        return int(func(args) or 0)
    except UniforgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was marked finished", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    return _run(args.func, args)


def export_main(argv: Sequence[str] | None = None) -> int:
    """`uniforget-export`: model -> masks -> plan -> slim UNet -> ONNX -> (TensorRT) -> Triton -> report."""
    mod = _load_stage("oneshot")
    if mod is None:
        print("error: uniforget-export is not available in this version yet", file=sys.stderr)
        return 2
    p = mod.build_parser()
    args = p.parse_args(argv)
    _setup_logging(-1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0))
    return _run(mod.run, args)


if __name__ == "__main__":
    sys.exit(main())
