"""Compare two stages' outputs and return data: per-output errors, NaN/Inf flags, pass/fail.

Why a separate module: every gate (masked == slim, torch == ONNX Runtime, ONNX Runtime == TensorRT)
uses the same comparator, and the report records the same numbers. Results are truthy when they pass.
An element passes when |cand - ref| <= atol + rtol * |ref| (NumPy's allclose rule); NaN or Inf in
either side always fails, because a NaN would otherwise make every comparison silently False.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ValidationError
from .runners import Feed, Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Pass rule per element: |cand - ref| <= atol + rtol * |ref|. Default is the fp32 torch -> ONNX gate."""

    atol: float = 1e-4
    rtol: float = 0.0


@dataclass(frozen=True)
class OutputComparison:
    """Errors of one named output for one input set."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |diff| / (|ref| + 1e-12), over elements where |ref| > 1e-6 * max|ref|
    mean_abs: float
    nonfinite_reference: bool
    nonfinite_candidate: bool
    passed: bool
    detail: str = ""
    reference_max_abs: float = 0.0  # the reference's own scale, so that max_abs can be read against it

    def __bool__(self) -> bool:
        return self.passed


@dataclass(frozen=True)
class Comparison:
    """All outputs of one input set (`label` says which: batch, resolution...)."""

    label: str
    outputs: tuple[OutputComparison, ...]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tol: Tolerance) -> OutputComparison:
    """Errors of one output; shape mismatch and non-finite values fail with a reason in `detail`."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    bad_ref = not bool(np.isfinite(ref).all())
    bad_cand = not bool(np.isfinite(cand).all())
    if ref.shape != cand.shape:
        return OutputComparison(name, tuple(cand.shape), float("inf"), float("inf"), float("inf"), bad_ref, bad_cand,
                                False, f"shape {tuple(cand.shape)} != reference {tuple(ref.shape)}")
    diff = np.abs(cand - ref)
    if diff.size == 0:
        return OutputComparison(name, tuple(ref.shape), 0.0, 0.0, 0.0, False, False, True)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mag = np.abs(ref)
        scale = np.nanmax(np.where(np.isfinite(mag), mag, 0.0))
        sig = mag > max(1e-6 * scale, 1e-30)
        max_rel = float(np.nanmax(diff[sig] / mag[sig])) if sig.any() else 0.0
        max_abs = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
        mean_abs = float(np.nanmean(diff)) if not np.isnan(diff).all() else float("nan")
        within = bool(np.all(diff <= tol.atol + tol.rtol * mag))
    detail = ""
    if bad_ref or bad_cand:
        detail = "NaN/Inf in " + " and ".join(s for s, b in (("reference", bad_ref), ("candidate", bad_cand)) if b)
    elif not within:
        detail = f"max abs {max_abs:.3g} > atol {tol.atol:g} + rtol {tol.rtol:g}*|ref|"
    return OutputComparison(name, tuple(ref.shape), max_abs, max_rel, mean_abs, bad_ref, bad_cand,
                            within and not bad_ref and not bad_cand, detail, float(scale))


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    tol: Tolerance = Tolerance(), label: str = "") -> Comparison:
    """Compare every reference output; a missing candidate output fails."""
    results = []
    for name, ref in reference.items():
        if name not in candidate:
            results.append(OutputComparison(name, tuple(np.shape(ref)), float("inf"), float("inf"), float("inf"),
                                            False, False, False, f"output missing (candidate has {sorted(candidate)})"))
            continue
        results.append(compare_arrays(name, ref, candidate[name], tol))
    return Comparison(label, tuple(results))


@dataclass(frozen=True)
class ParityReport:
    """Every input set's comparison between a reference and a candidate stage; truthy when all pass."""

    reference: str
    candidate: str
    tolerance: Tolerance
    cases: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for c in self.cases for o in c.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for c in self.cases for o in c.outputs), default=0.0)

    @property
    def reference_max_abs(self) -> float:
        """The largest |reference| value over every case and output: the scale max_abs is small against."""
        return max((o.reference_max_abs for c in self.cases for o in c.outputs), default=0.0)

    def failures(self) -> list[str]:
        """One line per failed output: which input set, which output, why."""
        return [f"[{c.label}] {o.name}: {o.detail or 'failed'} (max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g})"
                for c in self.cases for o in c.outputs if not o.passed]

    def summary(self) -> str:
        state = "PASS" if self.passed else "FAIL"
        return (f"{self.candidate} vs {self.reference}: {state} over {len(self.cases)} input sets, "
                f"max abs {self.max_abs:.3g} (reference up to {self.reference_max_abs:.3g}), "
                f"max rel {self.max_rel:.3g} (atol {self.tolerance.atol:g}, "
                f"rtol {self.tolerance.rtol:g})")

    def raise_on_failure(self) -> ParityReport:
        """Raise `ValidationError` listing every failure; returns self when it passes (for chaining)."""
        if not self.passed:
            fails = self.failures() or ["no input sets were compared"]
            raise ValidationError(f"{self.summary()}: " + "; ".join(fails), fails)
        return self

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "passed": self.passed,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "reference_max_abs": self.reference_max_abs,
                "tolerance": asdict(self.tolerance),
                "cases": [{"label": c.label, "passed": c.passed, "outputs": [asdict(o) for o in c.outputs]}
                          for c in self.cases]}


def check_parity(reference: Runner, candidate: Runner, feeds: Iterable[tuple[str, Feed]],
                 tol: Tolerance = Tolerance()) -> ParityReport:
    """Run both runners on each labelled feed and compare; activates/deactivates the runners itself."""
    cases = []
    with reference, candidate:
        for label, feed in feeds:
            ref = reference.infer(feed)
            cand = candidate.infer(feed)
            cases.append(compare_outputs(ref, cand, tol, label))
            log.debug("parity %s: %s", label, "ok" if cases[-1] else "FAIL")
    report = ParityReport(reference.name, candidate.name, tol, tuple(cases))
    log.info(report.summary())
    return report
