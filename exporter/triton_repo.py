"""Write a Triton Inference Server model repository for the slim UNet and the whole text-to-image pipeline.

Models written (each `<name>/config.pbtxt` + `<name>/1/<model file>`):
- `unet_onnx`   platform `onnxruntime_onnx`, the slim UNet ONNX, dynamic dims as -1;
- `unet_trt`    platform `tensorrt_plan`, only when a finished TensorRT build (unet.plan + build.json) is given;
- `pipeline`    backend `python`: prompt + seed -> uint8 image, running the exported ONNX pipeline
                (text encoder, slim UNet, VAE decoder) through ONNX Runtime, as Triton's Stable Diffusion
                tutorial runs its pipeline in a Python-backend model.
Instance groups and dynamic batching are options. Every config is built as plain data (ModelConfig's protobuf
JSON form), rendered to config.pbtxt and parsed back against Triton's own schema (tritonclient's model_config_pb2)
before the repository is renamed into place: a config Triton would reject never lands. On a base install without
tritonclient the same text is rendered here and only that schema check is skipped, with one logged note
(`TritonRepoResult.schema_checked` says which happened).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, MissingDependencyError, ValidationError
from .publish import publish_dir
from .tensorrt_build import BUILD_JSON, PLAN_NAME, InputSpec, load_build_record, onnx_io

log = logging.getLogger(__name__)

TRITON_HINT = 'pip install "uniforget[triton]" (tritonclient[http] and protobuf)'
SCHEMA_SKIPPED = ("config.pbtxt files not checked against Triton's ModelConfig schema: tritonclient is not "
                  f"installed; to check them, {TRITON_HINT}")
UNET_ONNX, UNET_TRT, PIPELINE = "unet_onnx", "unet_trt", "pipeline"
# what the Python-backend pipeline model imports (exporter.onnx_pipeline and its import closure: NumPy +
# onnxruntime + tokenizer only), copied into `<version>/vendor/` so the repository runs without this package
VENDORED = {"exporter": ("__init__.py", "errors.py", "runners.py", "onnx_pipeline.py", "tensorrt_build.py"),
            "uniforget": ("__init__.py", "errors.py")}
PIPELINE_SUBDIR = "pipeline"  # the ONNX pipeline folder inside the model's version folder

_NP_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}
_DEFAULT_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py"}


def schema_available() -> bool:
    """Whether Triton's ModelConfig schema (tritonclient + protobuf) can be loaded here."""
    try:
        model_config_pb2()
    except MissingDependencyError:
        return False
    return True


def model_config_pb2():
    """Triton's ModelConfig schema as shipped in tritonclient, without needing grpcio.

    `tritonclient.grpc/__init__` refuses to import without grpcio, but model_config_pb2 only needs protobuf, so
    where that import fails the generated module is loaded from its file.
    """
    try:
        from tritonclient.grpc import model_config_pb2 as mc  # noqa: PLC0415

        return mc
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"tritonclient is not installed (needed for Triton's config schema): "
                                     f"{TRITON_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    name = "_uniforget_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    try:
        mspec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    except (OSError, ImportError) as e:  # protobuf missing, or a runtime older than the generated code
        raise MissingDependencyError(f"cannot load Triton's ModelConfig schema from {path}: {e}; {TRITON_HINT}") from e
    sys.modules[name] = mod
    return mod


# --------------------------------------------------------------------------------------------------- validation

def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse protobuf text against Triton's ModelConfig and check what the schema alone cannot say.

    Raises ValidationError listing every problem (unknown fields, bad enums, missing types, bad dims...).
    """
    from google.protobuf import text_format  # noqa: PLC0415

    mc = model_config_pb2()
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise ValidationError(f"{where}: not a valid Triton ModelConfig: {e}", [str(e)]) from e
    problems = _semantic_problems(cfg, mc)
    if problems:
        raise ValidationError(f"{where}: " + "; ".join(problems), problems)
    return cfg


def _semantic_problems(cfg, mc) -> list[str]:
    problems = []
    if not cfg.name:
        problems.append("missing model name")
    if not cfg.backend and not cfg.platform:
        problems.append("neither backend nor platform is set")
    if cfg.max_batch_size < 0:
        problems.append(f"max_batch_size must be >= 0, got {cfg.max_batch_size}")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size == 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        if not tensors and cfg.platform != "ensemble":
            problems.append(f"no {kind}s declared")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            problems.append(f"duplicate {kind} names {names}")
        for t in tensors:
            if not t.name:
                problems.append(f"an {kind} has no name")
            if t.data_type == mc.TYPE_INVALID:
                problems.append(f"{kind} {t.name!r} has no data_type")
            if not t.dims:
                problems.append(f"{kind} {t.name!r} has no dims")
            if any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{kind} {t.name!r} dims {list(t.dims)}: each must be -1 (dynamic) or > 0")
    for g in cfg.instance_group:
        if g.count < 1:
            problems.append(f"instance_group count must be >= 1, got {g.count}")
    return problems


def config_message(cfg: dict[str, Any]):
    """Plain config data -> Triton's ModelConfig message (needs tritonclient); unknown fields are an error."""
    from google.protobuf import json_format  # noqa: PLC0415

    try:
        return json_format.ParseDict(cfg, model_config_pb2().ModelConfig())
    except json_format.ParseError as e:
        raise ValidationError(f"{cfg.get('name', 'config')}: not a valid Triton ModelConfig: {e}", [str(e)]) from e


def render_config(cfg: dict[str, Any], schema: bool | None = None) -> str:
    """config.pbtxt text of plain config data: through the protobuf message where tritonclient is installed
    (`schema` None: whenever it is), else by `render_text`, which writes the same fields without checking them."""
    if schema is None:
        schema = schema_available()
    if not schema:
        return render_text(cfg)
    from google.protobuf import text_format  # noqa: PLC0415

    return text_format.MessageToString(config_message(cfg))


_ENUM_FIELDS = {"data_type", "kind"}  # their values are enum names (TYPE_FP32, KIND_CPU), written unquoted
_MAP_FIELDS = {"parameters"}  # map<string, message>: written as repeated {key, value} entries


def _text_scalar(field: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if field in _ENUM_FIELDS:
        return str(v)
    raw = str(v).encode("utf-8")  # protobuf text escapes: quotes, backslash, non-printable and non-ASCII as octal
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03o}" for b in raw) + '"'


def render_text(cfg: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of plain config data (what text_format.MessageToString writes, field order aside)."""
    pad, lines = "  " * indent, []
    for field, v in cfg.items():
        if field in _MAP_FIELDS:
            for key, value in v.items():
                lines.append(f"{pad}{field} {{\n{pad}  key: {_text_scalar('key', key)}\n{pad}  value {{\n"
                             f"{render_text(value, indent + 2)}{pad}  }}\n{pad}}}")
        elif isinstance(v, dict):
            lines.append(f"{pad}{field} {{\n{render_text(v, indent + 1)}{pad}}}")
        elif isinstance(v, (list, tuple)) and not v:
            continue  # an empty repeated field is the same as an absent one
        elif isinstance(v, (list, tuple)) and isinstance(v[0], dict):
            lines += [f"{pad}{field} {{\n{render_text(item, indent + 1)}{pad}}}" for item in v]
        elif isinstance(v, (list, tuple)):
            lines.append(f"{pad}{field}: [{', '.join(_text_scalar(field, x) for x in v)}]")
        else:
            lines.append(f"{pad}{field}: {_text_scalar(field, v)}")
    return "".join(line + "\n" for line in lines)


def validate_repository(repo: Path) -> dict[str, Any]:
    """Parse every `<model>/config.pbtxt` and check the name and version folder; returns {name: ModelConfig}."""
    repo = Path(repo)
    if not repo.is_dir():
        why = f"model repository {repo} is a file, not a folder" if repo.exists() else \
            f"model repository not found: {repo}"
        raise ValidationError(why, [str(repo)])
    configs, problems = {}, []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        pbtxt = model_dir / "config.pbtxt"
        if not pbtxt.is_file():
            problems.append(f"{model_dir.name}: no config.pbtxt")
            continue
        try:
            cfg = parse_config(pbtxt.read_text(), str(pbtxt))
        except ValidationError as e:
            problems.extend(e.failures and [f"{model_dir.name}: {f}" for f in e.failures] or [str(e)])
            continue
        if cfg.name != model_dir.name:
            problems.append(f"{model_dir.name}: config name {cfg.name!r} differs from its folder name")
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            problems.append(f"{model_dir.name}: no numeric version folder")
        kind = cfg.platform or cfg.backend
        fname = cfg.default_model_filename or _DEFAULT_FILES.get(kind)
        for v in versions:
            if fname and not (v / fname).exists():
                problems.append(f"{model_dir.name}/{v.name}: {fname} missing")
        configs[cfg.name] = cfg
    if not configs and not problems:
        problems.append(f"{repo}: no models")
    if problems:
        raise ValidationError(f"model repository {repo} is invalid: " + "; ".join(problems), problems)
    return configs


# ------------------------------------------------------------------------------------------------------ writing

@dataclass(frozen=True)
class TritonRepoOptions:
    """What to put in the repository. Defaults: CPU instances, no batching (requests carry their own batch)."""

    out_dir: Path
    unet_onnx: Path | None = None  # slim UNet ONNX -> `unet_onnx`
    trt_dir: Path | None = None  # finished `uniforget build` folder (unet.plan + build.json) -> `unet_trt`
    pipeline_dir: Path | None = None  # exported ONNX pipeline folder -> `pipeline` (Python backend)
    python_env: Path | None = None  # EXECUTION_ENV_PATH for the Python backend (a venv with numpy<2)
    execution_env: bool = True  # False: no EXECUTION_ENV_PATH (the server's own Python has what model.py needs)
    max_batch_size: int = 0  # > 0: Triton batches along dim 0, dims then exclude it
    dynamic_batching: bool = False
    max_queue_delay_us: int = 100
    instances: int = 1
    instance_kind: str = "cpu"  # cpu | gpu | auto (the TensorRT model is always on a GPU)
    steps: int = 20  # pipeline defaults; a request may override steps / guidance_scale / seed
    guidance_scale: float = 7.5
    threads: int = 0  # ONNX Runtime intra-op threads in the pipeline model (0: ORT's default)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime providers in the pipeline model
    pipeline_unet: str = "onnxruntime"  # or "tensorrt": the pipeline model runs the UNet from trt_dir's plan
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ExportError(f"max batch size must be >= 0, got {self.max_batch_size}")
        if self.dynamic_batching and self.max_batch_size == 0:
            raise ExportError("dynamic batching needs --max-batch-size > 0")
        if self.instances < 1:
            raise ExportError(f"instances must be >= 1, got {self.instances}")
        if self.instance_kind not in ("cpu", "gpu", "auto"):
            raise ExportError(f"instance kind must be cpu, gpu or auto, got {self.instance_kind!r}")
        if self.pipeline_unet not in ("onnxruntime", "tensorrt"):
            raise ExportError(f"pipeline UNet runtime must be onnxruntime or tensorrt, got {self.pipeline_unet!r}")
        if self.pipeline_unet == "tensorrt" and (self.trt_dir is None or self.pipeline_dir is None):
            raise ExportError("a TensorRT UNet inside the pipeline model needs both a TensorRT build and a pipeline")
        if self.unet_onnx is None and self.trt_dir is None and self.pipeline_dir is None:
            raise ExportError("nothing to serve: give a UNet ONNX, a TensorRT build folder or an ONNX pipeline")


@dataclass(frozen=True)
class TritonRepoResult:
    path: Path
    models: tuple[str, ...]
    configs: dict[str, Path]
    schema_checked: bool = True  # False: tritonclient missing, configs written unchecked (SCHEMA_SKIPPED)
    external_data_bytes: int = 0  # ONNX external data cloned or copied into the repository (never hard-linked)


def _kind(kind: str) -> str:
    return {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO"}[kind]


def _tensor(spec: InputSpec, batched: bool) -> dict[str, Any]:
    """Dims from the ONNX shape: dynamic -> -1; with Triton batching dim 0 is implied and dropped, and a tensor
    that is only a batch axis (e.g. `timestep` (B,)) becomes dims [1] reshaped to a scalar per item."""
    if spec.dtype not in _NP_TO_TRITON:
        raise ExportError(f"tensor {spec.name!r} has type {spec.dtype}, which the Triton config cannot declare")
    t: dict[str, Any] = {"name": spec.name, "data_type": _NP_TO_TRITON[spec.dtype]}
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec.dims]
    if batched:
        if not dims:
            raise ExportError(f"tensor {spec.name!r} is a scalar and cannot be batched: use --max-batch-size 0")
        dims = dims[1:]
        if not dims:
            t["reshape"] = {}  # empty shape: one scalar per batch item
            dims = [1]
    t["dims"] = dims
    return t


def unet_config(name: str, platform: str, onnx_path: Path, opts: TritonRepoOptions, kind: str) -> dict[str, Any]:
    """ModelConfig (as plain data) for the UNet, IO names/types/dims from the ONNX graph the model (or plan) came
    from."""
    inputs, outputs = onnx_io(onnx_path)
    batched = opts.max_batch_size > 0
    if batched:
        for s in (*inputs, *outputs):
            if s.dims and isinstance(s.dims[0], int) and s.dims[0] > 0:
                raise ExportError(f"{onnx_path}: {s.name!r} has a fixed first dim {s.dims[0]}; Triton batching needs "
                                  "a dynamic batch axis (re-export with dynamic axes, or --max-batch-size 0)")
    cfg: dict[str, Any] = {"name": name, "platform": platform, "max_batch_size": opts.max_batch_size,
                           "input": [_tensor(s, batched) for s in inputs],
                           "output": [_tensor(s, batched) for s in outputs],
                           "instance_group": [{"kind": _kind(kind), "count": opts.instances}]}
    if opts.dynamic_batching:
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": opts.max_queue_delay_us}
    return cfg


def pipeline_config(opts: TritonRepoOptions, python_env: Path | None) -> dict[str, Any]:
    """The text-to-image model: one prompt per request (batching happens inside the pipeline's CFG batch)."""
    cfg: dict[str, Any] = {
        "name": PIPELINE, "backend": "python", "max_batch_size": 0,
        "input": [{"name": "prompt", "data_type": "TYPE_STRING", "dims": [1]},
                  {"name": "negative_prompt", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
                  {"name": "seed", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
                  {"name": "steps", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
                  {"name": "guidance_scale", "data_type": "TYPE_FP32", "dims": [1], "optional": True}],
        "output": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
        "instance_group": [{"kind": _kind("cpu" if opts.instance_kind == "cpu" else "auto"),
                            "count": opts.instances}]}
    params = {"pipeline_subdir": PIPELINE_SUBDIR, "steps": str(opts.steps),
              "guidance_scale": repr(float(opts.guidance_scale)), "threads": str(opts.threads),
              "providers": ",".join(opts.providers)}
    if opts.pipeline_unet == "tensorrt":
        params["unet_plan"] = "unet.plan"
    if python_env is not None:
        # the 2.51 Python backend breaks under numpy 2: run the stub inside a venv that has numpy<2
        params["EXECUTION_ENV_PATH"] = str(python_env)
    cfg["parameters"] = {k: {"string_value": v} for k, v in params.items()}
    return cfg


def default_python_env() -> Path | None:
    """The project's `.venv-triton` (scripts/setup_triton_env.sh) when it exists beside the package."""
    root = Path(__file__).resolve().parent.parent
    env = root / ".venv-triton"
    return env if (env / "bin" / "python").exists() else None


def _pipeline_sources() -> dict[str, Path]:
    """{path relative to the version folder: source file} for the Python-backend pipeline model."""
    root = Path(__file__).resolve().parent.parent
    srcs = {"model.py": root / "exporter" / "triton_models" / PIPELINE / "model.py"}
    for pkg, files in VENDORED.items():
        srcs.update({f"vendor/{pkg}/{f}": root / pkg / f for f in files})
    missing = [str(p) for p in srcs.values() if not p.is_file()]
    if missing:
        raise ExportError(f"the pipeline model needs {missing}, which this installation lacks")
    return srcs


def _write_config(model_dir: Path, cfg: dict[str, Any], schema: bool) -> Path:
    text = render_config(cfg, schema)
    if schema:
        parse_config(text, f"{model_dir.name}/config.pbtxt")  # round trip through Triton's schema
    p = model_dir / "config.pbtxt"
    p.write_text(text)
    return p


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link big model files when on the same filesystem (a repository of a 3 GB UNet costs no space),
    except ONNX external data, which is cloned or copied (`_clone_file`)."""
    if src.is_dir():
        data = external_data_files(src.rglob("*.onnx"))
        shutil.copytree(src, dst, copy_function=lambda s, d: (_clone_file if Path(s).resolve() in data
                                                              else _link_file)(s, d))
    else:
        _link_file(src, dst)


def _link_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_FICLONE = 0x40049409  # Linux ioctl: share the source's extents (btrfs, XFS, ...), copy-on-write


def _clone_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy an ONNX external-data file without linking it: onnx (>= 1.17) refuses to load external data that has
    more than one hard link or is a symlink (a guard against reading arbitrary files), and a hard link would also
    break `onnx.load` on the original, whose link count it shares. Where the filesystem can clone (reflink) the
    copy costs no space; elsewhere it is a full copy."""
    try:
        import fcntl  # noqa: PLC0415  (POSIX only)

        with open(src, "rb") as fs, open(dst, "wb") as fd:
            fcntl.ioctl(fd.fileno(), _FICLONE, fs.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):
        shutil.copy2(src, dst)


def external_data_files(graphs: Iterable[Path]) -> set[Path]:
    """The external-data files these ONNX graphs name (resolved paths; the graphs' weights are not read)."""
    import onnx  # noqa: PLC0415

    files = set()
    for g in graphs:
        model = onnx.load(str(g), load_external_data=False)
        files |= {(g.parent / e.value).resolve() for t in model.graph.initializer for e in t.external_data
                  if e.key == "location"}
    return files


def write_repository(opts: TritonRepoOptions) -> TritonRepoResult:
    """Write the repository to a temporary sibling, validate every config, rename into place."""
    out = Path(opts.out_dir)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to replace it")
    for label, p in (("UNet ONNX", opts.unet_onnx), ("ONNX pipeline folder", opts.pipeline_dir)):
        if p is not None and not Path(p).exists():
            raise ExportError(f"{label} not found: {p}")
    plan = None
    if opts.trt_dir is not None:
        plan = Path(opts.trt_dir) / PLAN_NAME
        if not plan.is_file() or not (Path(opts.trt_dir) / BUILD_JSON).is_file():
            raise ExportError(f"{opts.trt_dir} is not a finished TensorRT build (needs {PLAN_NAME} and {BUILD_JSON})")
    if opts.pipeline_dir is not None:
        need = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx", "tokenizer",
                "scheduler/scheduler_config.json")
        missing = [n for n in need if not (Path(opts.pipeline_dir) / n).exists()]
        if missing:
            raise ExportError(f"{opts.pipeline_dir} is not an exported ONNX pipeline (missing {', '.join(missing)}); "
                              "export it with `uniforget export`")
    python_env = opts.python_env if opts.python_env is not None else default_python_env()
    if not opts.execution_env:
        python_env = None
    if opts.pipeline_dir is not None and python_env is not None and not (Path(python_env) / "bin").is_dir():
        raise ExportError(f"Python environment for the pipeline model not found: {python_env}")

    schema = schema_available()
    if not schema:
        log.warning("%s", SCHEMA_SKIPPED)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    configs: dict[str, Path] = {}
    try:
        if opts.unet_onnx is not None:
            d = tmp / UNET_ONNX / "1"
            d.mkdir(parents=True)
            _copy_onnx(Path(opts.unet_onnx), d / "model.onnx")
            cfg = unet_config(UNET_ONNX, "onnxruntime_onnx", Path(opts.unet_onnx), opts, opts.instance_kind)
            configs[UNET_ONNX] = _write_config(tmp / UNET_ONNX, cfg, schema)
        if plan is not None:
            record = load_build_record(Path(opts.trt_dir))
            src_onnx = Path(record["onnx"]["path"])
            if not src_onnx.is_file():
                raise ExportError(f"the ONNX the plan was built from is gone: {src_onnx} (its IO defines the config)")
            _check_profile_covers(record, opts.max_batch_size)
            d = tmp / UNET_TRT / "1"
            d.mkdir(parents=True)
            _link_file(plan, d / "model.plan")
            shutil.copy2(Path(opts.trt_dir) / BUILD_JSON, tmp / UNET_TRT / BUILD_JSON)
            cfg = unet_config(UNET_TRT, "tensorrt_plan", src_onnx, opts, "gpu")
            configs[UNET_TRT] = _write_config(tmp / UNET_TRT, cfg, schema)
        if opts.pipeline_dir is not None:
            d = tmp / PIPELINE / "1"
            d.mkdir(parents=True)
            for rel, src in _pipeline_sources().items():
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, d / rel)
            _link_or_copy(Path(opts.pipeline_dir), d / PIPELINE_SUBDIR)
            if opts.pipeline_unet == "tensorrt":
                _link_file(plan, d / "unet.plan")
            configs[PIPELINE] = _write_config(tmp / PIPELINE, pipeline_config(opts, python_env), schema)
        if schema:
            validate_repository(tmp)
        data_bytes = sum(p.stat().st_size for p in external_data_files(tmp.rglob("*.onnx")))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Triton model repository written to %s: %s", out, ", ".join(configs))
    if data_bytes:
        log.info("%.2f GB of ONNX external data cloned or copied into it (onnx refuses to load hard-linked "
                 "external data; on a filesystem with reflinks the clone costs no space)", data_bytes / 1e9)
    return TritonRepoResult(out, tuple(configs), {k: out / v.relative_to(tmp) for k, v in configs.items()}, schema,
                            data_bytes)


def _copy_onnx(src: Path, dst: Path) -> None:
    """Copy an ONNX file with its external-data files (same folder, as onnx saves them; those are not linked)."""
    _link_file(src, dst)
    for data in external_data_files([src]):
        target = dst.parent / data.relative_to(src.parent.resolve())
        target.parent.mkdir(parents=True, exist_ok=True)
        _clone_file(data, target)


def _check_profile_covers(record: dict[str, Any], max_batch_size: int) -> None:
    """Triton would fail at load time if its batches exceed the engine's profile: say so now."""
    if max_batch_size <= 0:
        return
    for prof in record.get("profiles", []):
        for name, rng in prof.items():
            if rng["max"] and rng["max"][0] < max_batch_size:
                raise ExportError(f"--max-batch-size {max_batch_size} exceeds the engine profile's max batch "
                                  f"{rng['max'][0]} for input {name!r}; rebuild with a larger --max-batch")


def config_texts(repo: Path) -> dict[str, str]:
    """The config.pbtxt of every model, for reports and logs."""
    return {name: (Path(repo) / name / "config.pbtxt").read_text() for name in validate_repository(Path(repo))}
