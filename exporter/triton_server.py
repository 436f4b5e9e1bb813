"""Start a real `tritonserver` on loopback for a model repository, wait until it is ready, stop it cleanly.

Where the server comes from: any Triton install (`--server` + `--backend-dir`, e.g. NVIDIA's container under
/opt/tritonserver), or by default the one inside nvidia-pytriton in `.venv-triton` (scripts/setup_triton_env.sh).
That one has the Python backend only, and its Python-backend stub must match the venv's Python: we lay out a
private backend folder with the right stub, put the venv's base Python library on LD_LIBRARY_PATH (else the stub
loads a mismatched system libpython) and the venv's bin on PATH. Models whose backend the server lacks (the
ONNX Runtime / TensorRT UNet models with pytriton's server) are skipped with a warning: the server is started in
explicit model-control mode and loads only what it can serve.

Only HTTP is enabled, bound to 127.0.0.1; gRPC and metrics are off. The server runs in its own process group,
stopped with SIGTERM (then SIGKILL after a grace period) however the caller exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from uniforget.errors import UniforgetError

from .errors import MissingDependencyError
from .triton_repo import default_python_env, validate_repository

log = logging.getLogger(__name__)

SETUP_HINT = "run scripts/setup_triton_env.sh (creates .venv-triton with nvidia-pytriton's tritonserver)"
# model config platform/backend -> the backend folder a server needs for it
_BACKEND_OF = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "python": "python",
               "onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "ensemble": None}


class TritonServerError(UniforgetError):
    """The server could not start, did not become ready in time, or died."""


@dataclass(frozen=True)
class ServerOptions:
    """How to run the server. `http_port=0` picks a free loopback port."""

    repo: Path
    http_port: int = 8000
    models: tuple[str, ...] | None = None  # None: every model whose backend the server has
    python_env: Path | None = None  # venv holding nvidia-pytriton (default: the project's .venv-triton)
    server: Path | None = None  # an explicit tritonserver binary (then give backend_dir too)
    backend_dir: Path | None = None
    startup_timeout_s: float = 120.0
    log_verbose: int = 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerLayout:
    """The resolved binary, backend folder and environment to start it with."""

    server: Path
    backend_dir: Path
    env: dict[str, str]
    backends: tuple[str, ...]


def _pytriton_dist(python_env: Path) -> Path:
    hits = sorted(python_env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not hits:
        raise MissingDependencyError(f"no nvidia-pytriton Triton server in {python_env}: {SETUP_HINT}")
    return hits[-1]


def _python_libdir(python_env: Path) -> str:
    out = subprocess.run([str(python_env / "bin" / "python"), "-c",
                          "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def resolve_layout(opts: ServerOptions, workdir: Path) -> ServerLayout:
    """Find the server and lay out its backends; raises MissingDependencyError with what to install."""
    env = dict(os.environ)
    if opts.server is not None:
        if not Path(opts.server).is_file():
            raise MissingDependencyError(f"tritonserver not found at {opts.server}")
        backend_dir = Path(opts.backend_dir or Path(opts.server).resolve().parent.parent / "backends")
        if not backend_dir.is_dir():
            raise MissingDependencyError(f"Triton backend folder not found: {backend_dir} (pass --backend-dir)")
        backends = tuple(sorted(p.name for p in backend_dir.iterdir() if p.is_dir()))
        return ServerLayout(Path(opts.server), backend_dir, env, backends)

    python_env = opts.python_env or default_python_env()
    if python_env is None or not (Path(python_env) / "bin" / "python").exists():
        raise MissingDependencyError(f"no Triton server environment found: {SETUP_HINT}")
    python_env = Path(python_env).resolve()
    dist = _pytriton_dist(python_env)
    pyver = dist.parts[-4].removeprefix("python")  # .../lib/python3.11/site-packages/pytriton/tritonserver
    stub = dist / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no Python-backend stub for Python {pyver} ({stub})")
    backend_dir = workdir / "backends"
    py = backend_dir / "python"
    py.mkdir(parents=True)
    for src in (dist / "backends" / "python").iterdir():
        if src.is_file():
            (py / src.name).symlink_to(src)
    (py / "triton_python_backend_stub").symlink_to(stub)
    libdir = _python_libdir(python_env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(python_env / "bin"), env.get("PATH", "")))
    env["VIRTUAL_ENV"] = str(python_env)
    env.pop("PYTHONPATH", None)  # the project's numpy-2 environment must not leak into the stub
    env.pop("PYTHONHOME", None)
    return ServerLayout(dist / "bin" / "tritonserver", backend_dir, env, ("python",))


def _select_models(repo: Path, wanted: tuple[str, ...] | None, backends: tuple[str, ...]) -> list[str]:
    configs = validate_repository(repo)
    if wanted:
        unknown = [m for m in wanted if m not in configs]
        if unknown:
            raise TritonServerError(f"models {unknown} are not in {repo} (it has {sorted(configs)})")
    chosen = []
    for name, cfg in configs.items():
        need = _BACKEND_OF.get(cfg.platform or cfg.backend, cfg.backend or cfg.platform)
        ok = need is None or need in backends
        if wanted and name in wanted and not ok:
            raise TritonServerError(f"model {name!r} needs the {need!r} backend, which this server lacks "
                                    f"(it has {list(backends)}); use a full Triton install (--server, --backend-dir)")
        if not ok:
            log.warning("skipping model %s: this server has no %r backend (it has %s)", name, need, list(backends))
            continue
        if not wanted or name in wanted:
            chosen.append(name)
    if not chosen:
        raise TritonServerError(f"no model in {repo} can be served by this server (backends: {list(backends)})")
    return chosen


class TritonServer:
    """A running tritonserver; use as a context manager so it is stopped however the block ends."""

    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.port = opts.http_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.models: list[str] = []
        self._workdir: Path | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        """host:port, as tritonclient's InferenceServerClient takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.url}"

    def start(self) -> TritonServer:
        repo = Path(self.opts.repo).resolve()
        self._workdir = Path(tempfile.mkdtemp(prefix="uniforget-triton-"))
        try:
            layout = resolve_layout(self.opts, self._workdir)
            self.models = _select_models(repo, self.opts.models, layout.backends)
            cmd = [str(layout.server), f"--model-repository={repo}", f"--backend-directory={layout.backend_dir}",
                   "--http-address=127.0.0.1", f"--http-port={self.port}", "--allow-grpc=false",
                   "--allow-metrics=false", "--model-control-mode=explicit", "--exit-timeout-secs=10",
                   *[f"--load-model={m}" for m in self.models],
                   f"--log-verbose={self.opts.log_verbose}",
                   # a private shared-memory prefix: several servers (tests, users) may run side by side
                   f"--backend-config=python,shm-region-prefix-name=uniforget{os.getpid()}_{self.port}_"]
            self.log_path = self._workdir / "tritonserver.log"
            log.info("starting %s on %s (models: %s)", layout.server.name, self.endpoint, ", ".join(self.models))
            log.debug("command: %s", " ".join(cmd))
            with open(self.log_path, "wb") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=layout.env, cwd=self._workdir, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready; "
                                        f"log tail:\n{self.log_tail()}")
            if self._ready():
                log.info("Triton ready at %s", self.endpoint)
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver not ready after {self.opts.startup_timeout_s:.0f} s; "
                                f"log tail:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            for path in ("/v2/health/ready", *[f"/v2/models/{m}/ready" for m in self.models]):
                with urllib.request.urlopen(self.endpoint + path, timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group (the server and its Python-backend stubs), SIGKILL after `grace_s`."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", grace_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if proc is not None:  # stubs left behind in the group (the server was killed first)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self) -> int:
        """Block until the server exits (serve's foreground mode); returns its exit code."""
        if self.proc is None:
            return 0
        return self.proc.wait()
