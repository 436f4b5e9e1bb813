"""The toy's judge: a tiny CNN that reads shape and colour from generated pixels (shipped with the testbed).

Trained by scripts/train_toy.py on fresh renders of the neutral generator (plus noise and blur, so that
imperfect generations are still read), never on generations. Neutral fidelity = share of generations for
held-out prompts whose judged shape and colour both match the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

JUDGE_DIR = Path(__file__).parent / "judge"


class JudgeNet(nn.Module):
    """Three conv layers, global average pool, one head per attribute."""

    def __init__(self, n_shapes: int, n_colours: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 64)
        )
        self.shape_head = nn.Linear(64, n_shapes)
        self.colour_head = nn.Linear(64, n_colours)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.shape_head(h), self.colour_head(h)


class Judge:
    """Reads (shape, colour) from images (N, H, W, 3) float in [0, 1]."""

    def __init__(self, net: JudgeNet, shapes: list[str], colours: list[str]):
        self.net = net.eval()
        self.shapes = shapes
        self.colours = colours

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[list[str], list[str]]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        s, c = self.net(x)
        return [self.shapes[i] for i in s.argmax(1).tolist()], [self.colours[i] for i in c.argmax(1).tolist()]

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(out / "judge.safetensors"))
        (out / "judge.json").write_text(json.dumps({"shapes": self.shapes, "colours": self.colours}, indent=2))


def load_judge(path: str | Path | None = None) -> Judge:
    """Load the shipped judge (or one written by train_toy.py into another folder)."""
    d = Path(path) if path else JUDGE_DIR
    labels = json.loads((d / "judge.json").read_text())
    net = JudgeNet(len(labels["shapes"]), len(labels["colours"]))
    net.load_state_dict(load_file(str(d / "judge.safetensors")))
    return Judge(net, labels["shapes"], labels["colours"])
