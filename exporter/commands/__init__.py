"""One module per `uniforget <stage>` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`.

The CLI stays a thin layer: parse, build the stage's options, call the library, return an exit code.
"""

STAGES = ("learn", "plan", "prune", "retrain", "export", "build", "validate", "bench", "serve")


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
