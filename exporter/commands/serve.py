"""`uniforget serve`: run a real tritonserver on 127.0.0.1 for a model repository until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from exporter.argtypes import int_between, positive_float
from exporter.commands import STAGE_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help=STAGE_HELP["serve"],
        description="Start tritonserver on 127.0.0.1 (HTTP only), wait until the models are ready, print the "
                    "endpoint, and stop it cleanly on Ctrl-C / SIGTERM.")
    p.add_argument("--repo", type=Path, required=True, help="model repository (e.g. engines/NAME/triton)")
    p.add_argument("--http-port", type=int_between(0, 65535), default=8000,
                   help="HTTP port on 127.0.0.1 (0: pick a free one)")
    p.add_argument("--models", nargs="+", help="models to load (default: every one this server can run)")
    p.add_argument("--python-env", type=Path, help="venv with nvidia-pytriton (default: .venv-triton)")
    p.add_argument("--server", type=Path, help="another tritonserver binary (e.g. /opt/tritonserver/bin/tritonserver)")
    p.add_argument("--backend-dir", type=Path, help="its backends folder (default: beside the binary)")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds to wait for readiness")
    return p


def run(args: argparse.Namespace) -> int:
    from exporter.triton_server import ServerOptions, TritonServer, TritonServerError

    def on_term(signum, frame):  # SIGTERM -> the same clean stop as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    server = TritonServer(ServerOptions(
        repo=args.repo, http_port=args.http_port, models=tuple(args.models) if args.models else None,
        python_env=args.python_env, server=args.server, backend_dir=args.backend_dir,
        startup_timeout_s=args.timeout))
    try:
        server.start()
        print(f"Triton ready: {server.endpoint} (models: {', '.join(server.models)}; log: {server.log_path}); "
              "Ctrl-C to stop", flush=True)
        code = server.wait()
        if code != 0:
            raise TritonServerError(f"tritonserver exited with code {code}; log tail:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping Triton", flush=True)
    finally:
        server.stop()
    return 0
