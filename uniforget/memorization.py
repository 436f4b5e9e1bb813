"""Memorization and quality measures on generated images: pure NumPy, reusable on any pipeline's output.

- Copy detection (Gu et al. 2023): a generation x copies planted item k when its nearest training image
  (NN1) is item k and l2(x, NN1) / l2(x, NN2) < 1/3 in pixel space. Training images are grouped first:
  every copy of one planted item is one group (repeats or augmented copies must not serve as each other's
  NN2), every neutral image its own group; the distance to a group is the distance to its nearest member.
- Nearest-neighbour identity: the share of generations whose NN1 is the planted item (a weaker, fading copy
  still counts here; METHOD.md explains why both are reported).
- SSIM to the planted reference (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, channel mean,
  valid-window mean: the settings of Wang et al. 2004, as scikit-image computes them with gaussian_weights).
- Output drift: mean over images of the per-image RMS pixel difference, sqrt(mean_{h,w,c} (a - b)^2),
  for the same prompts and seeds on two models; pixels in [0, 1], so 0 = identical, 1 = black vs white.
- ROC AUC by the Mann-Whitney U statistic with mid-ranks for ties (identical sets give exactly 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COPY_RATIO = 1.0 / 3.0


@dataclass(frozen=True)
class CopyResult:
    """Per-generation nearest-neighbour facts; aggregate with the properties."""

    nn1_group: np.ndarray  # (G,) item index of NN1's group (-1 when NN1 is a neutral image)
    ratio: np.ndarray  # (G,) l2(x, NN1) / l2(x, NN2)
    expected: np.ndarray  # (G,) planted item expected for each generation (-1: none, e.g. neutral prompts)
    threshold: float = COPY_RATIO

    @property
    def is_copy(self) -> np.ndarray:
        """(G,) bool: NN1 is the expected planted item and the ratio test passes."""
        return (self.nn1_group == self.expected) & (self.expected >= 0) & (self.ratio < self.threshold)

    @property
    def is_any_item_copy(self) -> np.ndarray:
        """(G,) bool: a copy of *some* planted item (the check for neutral generations)."""
        return (self.nn1_group >= 0) & (self.ratio < self.threshold)

    @property
    def copy_rate(self) -> float:
        return _mean(self.is_copy)

    @property
    def nn_identity(self) -> float:
        """Share of generations whose nearest training image is the expected planted item."""
        return _mean((self.nn1_group == self.expected) & (self.expected >= 0))

    @property
    def any_item_copy_rate(self) -> float:
        return _mean(self.is_any_item_copy)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def _flat(images: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(images, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"{name}: expected images (N, H, W, C), got shape {a.shape}")
    return a.reshape(len(a), -1)


def pairwise_l2(x: np.ndarray, refs: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(G, R) Euclidean distances between flattened images, by the |x|^2 + |y|^2 - 2 x.y expansion in float64."""
    xf = _flat(x, "generations").astype(np.float64)
    rf = _flat(refs, "references").astype(np.float64)
    if xf.shape[1] != rf.shape[1]:
        raise ValueError(f"generations have {xf.shape[1]} values per image but references {rf.shape[1]}; "
                         "generate at the training resolution")
    r2 = np.einsum("ij,ij->i", rf, rf)
    out = np.empty((len(xf), len(rf)), np.float64)
    for i in range(0, len(xf), chunk):  # bounded memory for big reference sets
        xc = xf[i:i + chunk]
        d2 = np.einsum("ij,ij->i", xc, xc)[:, None] + r2[None, :] - 2.0 * xc @ rf.T
        out[i:i + chunk] = np.sqrt(np.maximum(d2, 0.0))
    return out


def detect_copies(generations: np.ndarray, references: np.ndarray, ref_item: np.ndarray,
                  expected_item: np.ndarray | int, threshold: float = COPY_RATIO) -> CopyResult:
    """Nearest-neighbour ratio test of every generation against the training set.

    `ref_item[j]` is the planted item index of reference j (-1 = neutral); `expected_item` is, per generation,
    the planted item its prompt should reproduce (-1 for neutral prompts).
    """
    ref_item = np.asarray(ref_item, dtype=np.int64)
    if len(ref_item) != len(references):
        raise ValueError(f"ref_item has {len(ref_item)} entries for {len(references)} reference images")
    expected = np.broadcast_to(np.asarray(expected_item, dtype=np.int64), (len(generations),)).copy()
    d = pairwise_l2(generations, references)  # (G, R)
    # one column per group: each neutral image alone, each planted item = min over its copies
    neutral_cols = np.flatnonzero(ref_item < 0)
    items = np.unique(ref_item[ref_item >= 0])
    cols = [d[:, neutral_cols]] + [d[:, ref_item == k].min(axis=1, keepdims=True) for k in items]
    gd = np.concatenate(cols, axis=1)  # (G, n_groups)
    group_item = np.concatenate([np.full(len(neutral_cols), -1, np.int64), items])
    if gd.shape[1] < 2:
        raise ValueError("copy detection needs at least two distinct training images")
    order = np.argpartition(gd, 1, axis=1)[:, :2]
    two = np.take_along_axis(gd, order, axis=1)
    swap = two[:, 0] > two[:, 1]
    nn1 = np.where(swap, order[:, 1], order[:, 0])
    d1, d2 = np.minimum(two[:, 0], two[:, 1]), np.maximum(two[:, 0], two[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d2 > 0, d1 / d2, 1.0)
    return CopyResult(nn1_group=group_item[nn1], ratio=ratio, expected=expected, threshold=threshold)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def _filter_valid(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over axes 1 and 2 of (N, H, W, C)."""
    n = len(k)
    h = a.shape[1] - n + 1
    w = a.shape[2] - n + 1
    rows = sum(k[i] * a[:, i:i + h] for i in range(n))
    return sum(k[j] * rows[:, :, j:j + w] for j in range(n))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> np.ndarray:
    """(N,) SSIM between image batches (N, H, W, C) (or single images (H, W, C) -> shape (1,)); y may be one image."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim == 3:
        x = x[None]
    if y.ndim == 3:
        y = np.broadcast_to(y[None], x.shape)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {x.shape} vs {y.shape}")
    if min(x.shape[1:3]) < win:
        raise ValueError(f"ssim: images {x.shape[1:3]} smaller than the {win}-pixel window")
    k = _gaussian_kernel(win, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    # population (not sample) covariance, as Wang et al.'s Gaussian-weighted definition
    mx, my = _filter_valid(x, k), _filter_valid(y, k)
    vx = _filter_valid(x * x, k) - mx * mx
    vy = _filter_valid(y * y, k) - my * my
    cxy = _filter_valid(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(len(s), -1).mean(axis=1)


def rms_drift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) per-image RMS pixel difference between two aligned image batches (same prompts and seeds)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"drift needs aligned batches; got {a.shape} vs {b.shape}")
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(axis=1))


def output_drift(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image RMS pixel difference (module docstring has the definition)."""
    return _mean(rms_drift(a, b))


def _midranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(len(v), np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): Mann-Whitney U / (n_pos n_neg), mid-ranks for ties."""
    p = np.asarray(positive, np.float64).ravel()
    n = np.asarray(negative, np.float64).ravel()
    if not len(p) or not len(n):
        raise ValueError("roc_auc needs at least one score in each set")
    if not (np.isfinite(p).all() and np.isfinite(n).all()):
        raise ValueError("roc_auc: scores must be finite")
    r = _midranks(np.concatenate([p, n]))
    u = r[: len(p)].sum() - len(p) * (len(p) + 1) / 2.0
    return float(u / (len(p) * len(n)))
