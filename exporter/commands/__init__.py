"""One module per `uniforget <stage>` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`.

The CLI stays a thin layer: parse, build the stage's options, call the library, return an exit code.
"""

import argparse
import textwrap

STAGES = ("learn", "plan", "prune", "retrain", "export", "build", "validate", "bench", "serve")
# one line per stage for `uniforget --help`, kept here so listing the stages imports none of them (and no torch)
STAGE_HELP = {
    "learn": "learn gates from neutral prompts -> MaskSet",
    "plan": "MaskSet + ratio -> PruningPlan (plan.json)",
    "prune": "MaskSet (or plan) -> slim UNet directory",
    "retrain": "slim UNet -> slim UNet fine-tuned to match the original on neutral prompts",
    "export": "export a UNet (and optionally the pipeline) to ONNX, with parity gates",
    "build": "build a TensorRT engine and/or a Triton model repository from the exported ONNX",
    "validate": "memorization and quality measures (copy rate, judge, Wen AUC, perturbed triggers)",
    "bench": "latency of dense vs slim UNet (torch eager, CUDA graph, torch.compile, ONNX Runtime, TensorRT)",
    "serve": "serve a Triton model repository on loopback (HTTP)",
}


class DocstringFormatter(argparse.HelpFormatter):
    """A stage's module docstring as its --help description, fitted to the terminal: prose paragraphs are
    re-wrapped, indented command lines are wrapped at spaces with a deeper indent (never cut mid-word)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in textwrap.dedent(text).strip().split("\n\n"):
            lines = block.splitlines()
            if all(line.startswith("    ") for line in lines):
                blocks.append("\n".join(textwrap.fill(line, width, initial_indent=indent,
                                                       subsequent_indent=indent + " " * 8, break_long_words=False,
                                                       break_on_hyphens=False)
                                         for line in lines))
            else:
                blocks.append(textwrap.fill(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                            subsequent_indent=indent, break_on_hyphens=False))
        return "\n\n".join(blocks)


def quiet_libraries(verbose: int = 0) -> None:
    """Silence diffusers'/transformers' loading bars and the ONNX tracer's warnings (-vv keeps them).

    Our own stage lines and progress bars say what is loading; the libraries' bars for a local folder are noise
    that buries a one-line error. Called by a stage once its options are checked, since it imports torch and
    diffusers.
    """
    if verbose >= 2:
        return
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    import torch

    # the ONNX tracer's warnings are about code paths the parity gates already check on several shapes
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"Exporting aten::")
