"""Fixtures shared by the `uniforget` and `exporter` tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest


def constant_judge(images: np.ndarray) -> tuple[list[str], list[str]]:
    """Says 'red circle' to everything: judge accuracy is then exactly the share of red-circle labels."""
    return ["circle"] * len(images), ["red"] * len(images)


@pytest.fixture(scope="session")
def planted_eval_data() -> Callable[..., Any]:
    """Build evaluation data whose planted items are the pipeline's own seed-0 generations for the memorized
    captions (so the original model copies them exactly), among `n_neutral` blocky random training images."""
    from uniforget.evaluate import EvalData
    from uniforget.generate import generate

    def build(pipe: Any, captions: Sequence[str], neutral: Sequence[str], shapes: Sequence[str],
              colours: Sequence[str], steps: int, guidance: float, n_neutral: int = 50,
              item_names: Sequence[str] = ("zorblax", "quillon")) -> EvalData:
        items = generate(pipe, captions, [0], steps=steps, guidance=guidance)
        rng = np.random.default_rng(0)
        small = rng.uniform(0, 1, (n_neutral, 4, 4, 3)).astype(np.float32)
        scale = items.shape[1] // 4
        blocky = np.repeat(np.repeat(small, scale, axis=1), scale, axis=2)
        k = len(captions)
        return EvalData(
            neutral_prompts=tuple(neutral), memorized_captions=tuple(captions), memorized_item=tuple(range(k)),
            item_names=tuple(item_names),
            item_images=items, train_images=np.concatenate([blocky, items]),
            train_item=np.concatenate([np.full(n_neutral, -1), np.arange(k)]),
            neutral_shapes=tuple(shapes), neutral_colours=tuple(colours), judge=constant_judge)

    return build


class _Kill:
    """Step callbacks that stop a run mid-way, as a kill would: `with pytest.raises(kill.Killed): run(callback=
    kill.at(4))`; a run's last checkpoint then stays for `--resume`."""

    class Killed(Exception):
        pass

    @classmethod
    def at(cls, step: int) -> Callable[[Any], None]:
        def callback(stats: Any) -> None:
            if stats.step == step:
                raise cls.Killed

        return callback


@pytest.fixture(scope="session")
def kill() -> type[_Kill]:
    return _Kill
