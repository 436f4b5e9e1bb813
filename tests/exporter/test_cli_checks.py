"""What a new user meets first: a bad option or an output path that can never be written is refused as one line
`error: ...` with exit code 2 before torch or diffusers is imported, and library chatter that is not theirs
(transformers' "requires torchvision" fallback notes) stays off stderr while real errors stay visible."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import _setup_logging, main
from exporter.errors import ExportError
from exporter.publish import check_can_create

ROOT = Path(__file__).resolve().parents[2]

# Runs the real entry point in a fresh interpreter (this one has torch imported already) and reports what the
# refusal cost: its exit code and whether any heavy module was imported on the way.
PROBE = """
import json, sys
from exporter.cli import export_main
try:
    rc = export_main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "diffusers", "transformers", "onnx",
                                                         "onnxruntime") if m in sys.modules)}))
"""


def _one_shot(*argv: str, cwd: Path = ROOT) -> tuple[dict, list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.strip().splitlines()


@pytest.fixture()
def a_file(tmp_path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("not a folder")
    return f


BAD = {
    "ratio 1.0": (["--ratio", "1.0"], "--ratio"),
    "ratio nan": (["--ratio", "nan"], "--ratio"),
    "ratio word": (["--ratio", "most"], "--ratio"),
    "seeds 0": (["--seeds", "0"], "--seeds"),
    "seeds not a number": (["--seeds", "many"], "--seeds"),
    "guidance nan": (["--guidance", "nan"], "--guidance"),
    "steps 0": (["--steps", "0"], "--steps"),
    "neutral prompts 0": (["--neutral-prompts", "0"], "--neutral-prompts"),
    "perturb inf": (["--perturb", "0.1,inf"], "--perturb"),
    "optimized perturbation -1": (["--optimized-perturbation", "-1"], "--optimized-perturbation"),
    "bench runs 5": (["--bench-runs", "5"], "--bench-runs"),
    "onnx atol -1": (["--onnx-atol", "-1"], "--onnx-atol"),
    "learn steps 0": (["--learn-steps", "0"], "--learn-steps"),
    "empty seeds -1": (["--empty-seeds", "-1"], "--empty-seeds"),
    "fp16 without trt": (["--fp16"], "--fp16"),
    "unknown beta": (["--beta", "huge"], "--beta"),
    "unknown option": (["--colour", "red"], "--colour"),
    "masks missing": (["--masks", "no/such/masks.safetensors"], "masks file not found"),
    "eval spec missing": (["--eval-spec", "no/such/spec.json"], "--eval-spec"),
    "model missing": (["--model", "no/such/model"], "model not found"),
}


@pytest.mark.parametrize("argv, needle", BAD.values(), ids=BAD.keys())
def test_one_shot_refuses_bad_options_in_one_line_before_heavy_imports(tmp_path, argv, needle):
    res, err = _one_shot(*argv, "--out", str(tmp_path / "out"))
    assert res["rc"] == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert res["heavy"] == [], f"refusing {argv} imported {res['heavy']}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_one_shot_refuses_an_out_under_proc(tmp_path):
    res, err = _one_shot("--ratio", "0.05", "--out", "/proc/x/y")
    assert res["rc"] == 2 and res["heavy"] == []
    assert len(err) == 1 and err[0].startswith("error: cannot create --out /proc/x/y"), err


def test_one_shot_refuses_an_out_whose_parent_is_a_file(tmp_path, a_file):
    res, err = _one_shot("--ratio", "0.05", "--out", str(a_file / "y"))
    assert res["rc"] == 2 and res["heavy"] == []
    assert len(err) == 1 and "is a file" in err[0] and str(a_file) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [a_file.name]  # the write probe left nothing


def test_check_can_create(tmp_path, a_file):
    check_can_create(tmp_path / "new" / "deeper")  # missing levels are fine: the nearest folder is writable
    check_can_create(tmp_path)
    assert list(tmp_path.iterdir()) == [a_file]
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_can_create(a_file)
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_can_create(a_file / "a" / "b")


def test_stage_usage_mistake_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--ratio"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err == ["error: argument --ratio: expected one argument (see uniforget plan --help)"]


@pytest.mark.parametrize("argv, line", [
    (["plan", "--frob"], "error: unrecognized arguments: --frob (see uniforget plan --help)"),
    (["prune", "--oot", "x", "--ratio", "-0.1"], "error: unrecognized arguments: --oot (see uniforget prune --help)"),
    (["plan", "--mask", "m"], "error: the following arguments are required: --ratio (see uniforget plan --help)"),
    (["--frob"], "error: unrecognized arguments: --frob (see uniforget --help)"),
])
def test_an_unknown_option_is_named_before_missing_required_ones(argv, line, capsys):
    """A typo is the mistake to report: argparse alone would say only that --masks and --ratio are missing.
    A known option's abbreviation (--mask) and a negative number are not unknown options."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_prune_refuses_an_unwritable_out_before_loading(a_file, capsys):
    rc = main(["prune", "--model", "no/such/model", "--ratio", "0.05", "--masks", "m.safetensors",
               "--out", str(a_file / "slim")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a file, not a folder" in err[0], err


# ------------------------------------------------------------------------------------------ library chatter

def test_transformers_warnings_off_and_errors_kept(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    tlog = logging.getLogger("transformers")
    monkeypatch.setattr(tlog, "level", tlog.level)
    _setup_logging(0)
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"  # read by transformers when it is imported later
    if "transformers" in sys.modules:
        assert not tlog.isEnabledFor(logging.WARNING) and tlog.isEnabledFor(logging.ERROR)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own choice wins
    tlog.setLevel(logging.INFO)
    _setup_logging(0)
    assert tlog.isEnabledFor(logging.INFO)


def test_diffusers_empty_fp32_list_note_dropped_and_real_ones_kept():
    _setup_logging(0)
    _setup_logging(0)  # idempotent: one filter, not two
    log = logging.getLogger("diffusers.models.modeling_utils")
    assert len(log.filters) == len({type(f) for f in log.filters})
    noise = "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly with"
    assert not all(f.filter(logging.makeLogRecord({"msg": noise})) for f in log.filters)
    real = "There are modules in UNet2DConditionModel that should be kept in float32: ['conv_in']. Casting"
    assert all(f.filter(logging.makeLogRecord({"msg": real})) for f in log.filters)


def test_cli_stderr_has_no_torchvision_fallback_note(tiny_model_dir, tiny_masks, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # as a user's shell has it
    plain = subprocess.run([sys.executable, "-c", "from diffusers import StableDiffusionPipeline"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if "requires torchvision" not in plain.stderr:
        pytest.skip("this environment's transformers does not print the torchvision note: nothing to silence")
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "plan", "--model", str(tiny_model_dir), "--masks",
                           str(tiny_masks), "--ratio", "0.05", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "requires torchvision" not in proc.stderr
    assert "[transformers]" not in proc.stderr


def test_stage_hides_library_loading_bars_unless_vv(tiny_model_dir, tiny_masks, tmp_path):
    """diffusers' "Loading pipeline components" bar is the libraries' noise, not a stage's progress; -vv shows it."""

    def prune(*flags: str, out: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "exporter.cli", *flags, "prune", "--model", str(tiny_model_dir),
                               "--masks", str(tiny_masks), "--ratio", "0.05", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "Loading pipeline components" in prune("-vv", out="loud"), "diffusers no longer draws the bar: rewrite"
    assert "Loading pipeline components" not in prune(out="quiet")


# ------------------------------------------------------------------------------ stages: paths before work

def _refusal(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_stage_outputs_that_cannot_be_written_are_refused_before_work(tmp_path, a_file, capsys):
    existing = tmp_path / "masks.safetensors"
    existing.write_bytes(b"x")
    cases = [
        (["learn", "--out", "/proc/x/m.safetensors"], "cannot create --out"),
        (["learn", "--out", str(tmp_path)], "is a folder"),
        (["learn", "--out", str(existing)], "already exists; pass --overwrite"),
        (["learn", "--out", str(tmp_path / "m.safetensors"), "--history", str(a_file / "h.jsonl")], "--history"),
        (["plan", "--masks", "m", "--ratio", "0.05", "--out", str(existing)], "already exists; pass --overwrite"),
        (["plan", "--masks", "m", "--ratio", "0.05", "--out", "/proc/x/plan.json"], "cannot create --out"),
        (["retrain", "--slim", str(tmp_path), "--out", "/proc/x/y"], "cannot create --out"),
        (["validate", "--json", str(tmp_path)], "--json"),
        (["bench", "--slim", str(tmp_path), "--json", str(a_file / "x.json")], "--json"),
    ]
    for argv, needle in cases:
        assert needle in _refusal(argv, capsys), argv
    assert existing.read_bytes() == b"x" and not list(tmp_path.glob("*.partial"))


def test_stage_inputs_are_checked_before_the_model_loads(tmp_path, a_file, capsys):
    bad_json = tmp_path / "eval.json"
    bad_json.write_text('{"neutral": "a red cube", "memorized": "x"}')
    cases = [
        (["plan", "--masks", str(a_file), "--ratio", "0.05", "--out", str(tmp_path / "p.json")],
         "--masks: "),
        (["plan", "--masks", str(tmp_path), "--ratio", "0.05", "--out", str(tmp_path / "p.json")], "is a folder"),
        (["prune", "--masks", str(a_file), "--out", str(tmp_path / "slim")], "give --masks and --ratio, or --plan"),
        (["validate", "--prompts", str(bad_json)], "--prompts: "),
        (["validate", "--judge", str(tmp_path / "nope")], "--judge folder not found"),
        (["learn", "--out", str(tmp_path / "m.safetensors"), "--model", "no/such/model"], "--model not found"),
        (["retrain", "--slim", str(tmp_path), "--out", str(tmp_path / "rt")], "not a slim UNet folder"),
        (["build", "--out", str(tmp_path), "--onnx", str(a_file), "--triton"], "not a readable ONNX model"),
        (["build", "--out", str(tmp_path), "--onnx", str(tmp_path), "--triton"], "is a folder"),
    ]
    for argv, needle in cases:
        assert needle in _refusal(argv, capsys), argv
    assert not (tmp_path / "triton").exists()


def test_logging_options_after_the_stage(capsys):
    err = _refusal(["plan", "-q", "--masks", "no/such/m.safetensors", "--ratio", "0.05"], capsys)
    assert "--masks file not found" in err


@pytest.mark.parametrize("stage", ["learn", "plan", "prune", "retrain", "export", "build", "validate", "bench",
                                   "serve"])
def test_stage_help_fits_80_columns(stage, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 0 and len(out) > 5
    assert max(len(line) for line in out) <= 80, max(out, key=len)


def test_one_shot_parses_eval_prompts_and_masks_before_any_stage(tmp_path, a_file):
    bad = tmp_path / "eval.json"
    bad.write_text('{"neutral": [1, 2], "memorized": [{"caption": "x"}]}')
    res, err = _one_shot("--ratio", "0.05", "--eval-prompts", str(bad), "--out", str(tmp_path / "out"))
    assert res["rc"] == 2 and res["heavy"] == [], err
    assert len(err) == 1 and err[0].startswith("error: --eval-prompts: ") and "'neutral'" in err[0], err
    res, err = _one_shot("--ratio", "0.05", "--masks", str(a_file), "--out", str(tmp_path / "out"))
    assert res["rc"] == 2 and res["heavy"] == [], err
    assert len(err) == 1 and "--masks: " in err[0] and "safetensors" in err[0], err
    assert not (tmp_path / "out").exists()


STAGE_PROBE = """
import json, sys
from exporter.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--repo", "r", "--http-port", "70000"],
                                  ["build", "--out", "o", "--triton", "--steps", "0"],
                                  ["export", "--unet", "u", "--out", "o", "--atol", "-1"],
                                  ["bench", "--slim", "s", "--runs", "5"], ["validate", "--batch-size", "0"],
                                  ["learn", "--beta", "foo"], ["learn", "--ladder", "5,1"],
                                  ["learn", "--beta", "auto", "--budget-statistic", "mean"],
                                  ["learn", "--targets", "heads,mlp"], ["learn", "--out", "."],
                                  ["plan", "--masks", "m", "--ratio", "2"], ["plan", "--masks", "absent", "--ratio", "0.1"],
                                  ["prune", "--out", "o", "--masks", "m", "--ratio", "0.05", "--ref-seq", "4"],
                                  ["retrain", "--slim", "s", "--out", "o", "--lr-min", "1"],
                                  ["retrain", "--slim", "absent", "--out", "o"]],
                         ids=lambda a: " ".join(a))
def test_stages_refuse_without_importing_torch(argv):
    """Only the stage a command line names is imported, and every stage builds its options' frozen configs
    (uniforget.configs) and checks its paths before it imports torch, so listing the stages and refusing a bad
    option costs a fraction of a second, not torch's import."""
    proc = subprocess.run([sys.executable, "-c", STAGE_PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"rc": 0 if argv == ["--help"] else 2, "torch": False}, proc.stderr
