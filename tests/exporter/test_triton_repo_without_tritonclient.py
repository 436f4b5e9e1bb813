"""The Triton repository on a base install (`pip install -e .`, no tritonclient): the configs are still written,
only the check against Triton's schema is skipped, with one logged note naming what to install, and the
one-shot records the skip in its report. Where tritonclient is installed the same text parses against the real
schema to the same ModelConfig, and the real schema is what the writer uses."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from exporter import oneshot
from exporter.errors import MissingDependencyError
from exporter.report import ReportData, to_json
from exporter.triton_repo import (
    PIPELINE,
    SCHEMA_SKIPPED,
    UNET_ONNX,
    TritonRepoOptions,
    model_config_pb2,
    schema_available,
    write_repository,
)

HAVE_TRITONCLIENT = schema_available()


@pytest.fixture()
def no_tritonclient(monkeypatch):
    """Make `import tritonclient` fail in this process, as on a base install (None in sys.modules blocks it)."""
    for name in [m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient.")] + ["tritonclient"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert not schema_available()


def _options(out: Path, unet_onnx: Path, pipeline_dir: Path) -> TritonRepoOptions:
    """Batching and two instances, and a Python env whose path needs escaping (quote, non-ASCII)."""
    env = out.parent / 'envs' / 'tritón "py"'
    (env / "bin").mkdir(parents=True, exist_ok=True)
    return TritonRepoOptions(out_dir=out, unet_onnx=unet_onnx, pipeline_dir=pipeline_dir, max_batch_size=4,
                             dynamic_batching=True, instances=2, python_env=env)


def test_schema_loader_says_what_to_install(no_tritonclient):
    with pytest.raises(MissingDependencyError, match=r'pip install "uniforget\[triton\]"'):
        model_config_pb2()


def test_repository_is_written_with_one_note(no_tritonclient, tmp_path, unet_onnx, pipeline_dir, caplog):
    with caplog.at_level(logging.INFO, logger="exporter"):
        res = write_repository(_options(tmp_path / "t", unet_onnx, pipeline_dir))
    assert res.schema_checked is False
    assert set(res.models) == {UNET_ONNX, PIPELINE}
    assert all(p.is_file() for p in res.configs.values())
    notes = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(notes) == 1 and notes[0].getMessage() == SCHEMA_SKIPPED
    assert "schema" in SCHEMA_SKIPPED and 'pip install "uniforget[triton]"' in SCHEMA_SKIPPED
    text = (res.path / PIPELINE / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and "data_type: TYPE_STRING" in text and "EXECUTION_ENV_PATH" in text


@pytest.mark.skipif(not HAVE_TRITONCLIENT, reason='needs tritonclient to compare: pip install "uniforget[triton]"')
def test_unchecked_text_parses_to_the_checked_config(tmp_path, unet_onnx, pipeline_dir, monkeypatch):
    """The base-install text, read back by the real schema, is exactly the config written with the schema."""
    from exporter.triton_repo import validate_repository

    with monkeypatch.context() as m:
        for name in [k for k in sys.modules if k == "tritonclient" or k.startswith("tritonclient.")] + ["tritonclient"]:
            m.setitem(sys.modules, name, None)
        unchecked = write_repository(_options(tmp_path / "plain", unet_onnx, pipeline_dir))
    assert schema_available()
    checked = write_repository(_options(tmp_path / "schema", unet_onnx, pipeline_dir))
    assert checked.schema_checked is True and unchecked.schema_checked is False
    a, b = validate_repository(unchecked.path), validate_repository(checked.path)
    assert a.keys() == b.keys() == {UNET_ONNX, PIPELINE}
    for name in a:
        assert a[name] == b[name], name
    assert list(a[UNET_ONNX].input[1].dims) == [1] and a[UNET_ONNX].input[1].HasField("reshape")  # timestep
    assert a[PIPELINE].parameters["EXECUTION_ENV_PATH"].string_value.endswith('envs/tritón "py"')


@pytest.mark.skipif(not HAVE_TRITONCLIENT, reason='needs tritonclient: pip install "uniforget[triton]"')
def test_real_schema_rejects_a_bad_config_where_installed(tmp_path, unet_onnx, monkeypatch):
    """With tritonclient present the writer really parses against Triton's schema (not the plain renderer)."""
    from exporter import triton_repo
    from exporter.errors import ValidationError

    real = triton_repo.unet_config
    monkeypatch.setattr(triton_repo, "unet_config", lambda *a, **k: {**real(*a, **k), "colour": "red"})
    with pytest.raises(ValidationError, match="colour"):
        write_repository(TritonRepoOptions(out_dir=tmp_path / "t", unet_onnx=unet_onnx))
    assert not (tmp_path / "t").exists()


def test_one_shot_stage_records_the_skip(no_tritonclient, tmp_path, unet_onnx):
    (tmp_path / "onnx").mkdir()
    shutil.copy(unet_onnx, tmp_path / "onnx" / "unet.onnx")
    run = oneshot._Run(oneshot.ExportOptions(), tmp_path, oneshot._Quiet())
    summary, gate = oneshot.stage_triton(run)
    assert "schema check skipped" in summary and gate is None
    assert (tmp_path / "triton" / UNET_ONNX / "config.pbtxt").is_file()
    assert len(run.notes) == 1 and SCHEMA_SKIPPED in run.notes[0]
    report = to_json(ReportData(title="t", command="uniforget-export", options={}, stages=(), plan={}, parity={},
                                notes=tuple(run.notes)))
    assert any('pip install "uniforget[triton]"' in n for n in report["notes"])
