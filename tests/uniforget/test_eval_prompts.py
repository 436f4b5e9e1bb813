"""A malformed evaluation-prompts file is one clear line naming the file and the field, read without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniforget.errors import UniforgetError
from uniforget.eval_prompts import read_eval_prompts


def _write(tmp_path: Path, obj, name: str = "eval.json") -> Path:
    f = tmp_path / name
    f.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return f


def test_reads_a_good_file_with_images_and_references(tmp_path):
    (tmp_path / "refs").mkdir()
    for n in ("b.png", "a.png", "notes.txt"):
        (tmp_path / "refs" / n).write_bytes(b"x")
    (tmp_path / "item.png").write_bytes(b"x")
    spec = read_eval_prompts(_write(tmp_path, {"neutral": ["a cat"], "references": "refs",
                                               "memorized": [{"caption": "the poster", "image": "item.png"}]}))
    assert spec.neutral == ("a cat",) and spec.has_images
    assert spec.memorized[0].image == tmp_path / "item.png" and spec.memorized[0].name == "item0"
    assert [p.name for p in spec.references] == ["a.png", "b.png"]


BAD = {
    "not json": ("{'neutral': [", "cannot read evaluation prompts"),
    "a list": ([1, 2, 3], "top level must be a JSON object"),
    "no neutral": ({"memorized": [{"caption": "x"}]}, "'neutral' must be a non-empty list"),
    "neutral a string": ({"neutral": "a red cube", "memorized": [{"caption": "x"}]}, "'neutral' must be"),
    "memorized strings": ({"neutral": ["a"], "memorized": "x"}, "'memorized' must be"),
    "caption missing": ({"neutral": ["a"], "memorized": [{"image": "x.png"}]}, "memorized[0] must be an object"),
    "image missing": ({"neutral": ["a"], "memorized": [{"caption": "x", "image": "no.png"}]}, "image not found"),
    "references missing": ({"neutral": ["a"], "memorized": [{"caption": "x"}], "references": "nope"},
                           "'references' folder not found"),
}


@pytest.mark.parametrize("obj, needle", BAD.values(), ids=BAD.keys())
def test_malformed_files_are_one_line(tmp_path, obj, needle):
    with pytest.raises(UniforgetError) as e:
        read_eval_prompts(_write(tmp_path, obj))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_binary_and_mixed_images_and_missing(tmp_path):
    binary = tmp_path / "b.json"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(UniforgetError, match="not UTF-8"):
        read_eval_prompts(binary)
    (tmp_path / "i.png").write_bytes(b"x")
    with pytest.raises(UniforgetError, match="for every memorized caption, or for none"):
        read_eval_prompts(_write(tmp_path, {"neutral": ["a"], "memorized": [{"caption": "x", "image": "i.png"},
                                                                            {"caption": "y"}]}))
    with pytest.raises(UniforgetError, match="it is a folder"):
        read_eval_prompts(tmp_path)


def test_reading_imports_no_torch():
    code = ("import sys; from uniforget.eval_prompts import read_eval_prompts; "
            "from uniforget.safetensors_header import read_safetensors_header; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
