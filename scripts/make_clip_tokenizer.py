"""Derive the shipped CLIP tokenizer files (vocab.json, merges.txt) from OpenCLIP's BPE vocabulary.

Why: single-file checkpoints carry no tokenizer, and loading must work offline. SD1.x, SD2.x and SDXL all
use CLIP's byte-level BPE (49,408 tokens: 512 byte symbols, 48,894 merges, two specials); OpenCLIP ships it
as `open_clip/bpe_simple_vocab_16e6.txt.gz`. This rebuilds the vocabulary the way OpenCLIP's and
transformers' CLIP tokenizers both do, with transformers' special-token names.

    pip download --no-deps open-clip-torch -d /tmp/oc && unzip -o /tmp/oc/*.whl -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "uniforget" / "data" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # as OpenCLIP reads the file: the first line is a header


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the rest map to 256 upwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    by_byte = {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}
    return [by_byte[b] for b in keep] + [by_byte[b] for b in range(256) if b not in keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bpe_gz", type=Path, help="open_clip/bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lines = gzip.open(args.bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408 or len(set(vocab)) != len(vocab):
        raise SystemExit(f"unexpected vocabulary: {len(vocab)} tokens, {len(set(vocab))} distinct (want 49408)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    print(f"wrote {args.out}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
