"""One module per `uniforget <stage>` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`.

The CLI stays a thin layer: parse, build the stage's options, call the library, return an exit code.
"""

STAGES = ("learn", "plan", "prune", "retrain", "export", "build", "validate", "bench", "serve")
