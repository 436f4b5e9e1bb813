"""The hard-concrete gate of UniForget's appendix (eq. 10-11) and the relaxed mask of its L1 term.

    M_bar   = sigmoid((log(M + 0.5) - log(1 - M + 0.5) + lam) / alpha) * (high - low) + low
    M_tilde = clamp(M_bar, 0, 1)                     (applied to the modules)
    sigma_hat(M) = sigmoid(M * 0.4 + 1)              (used only in the L1 term)

The paper leaves lam, alpha and the initial M open. Our choice: lam = 0, alpha = 1/3, M_init = 1.
At M = 1 the argument is log(3) * 3 = 3.30, so M_bar = 0.964 * 1.2 - 0.1 = 1.057 and the clamp gives
exactly 1.0: the gated model equals the original bit for bit at initialization (the multiply is by 1.0).
With these constants a gate is exactly 0 for M <= 0.120 and exactly 1 for M >= 0.880; M lives in
(-0.5, 1.5), the domain of the logs, and is clamped there.
"""

from __future__ import annotations

import torch

from .configs import GateConfig as GateConfig  # re-exported

M_MIN, M_MAX = -0.5, 1.5
_EPS = 1e-4


def hard_concrete(m: torch.Tensor, cfg: GateConfig = GateConfig()) -> torch.Tensor:
    """Deterministic hard-concrete gate value in [0, 1] for gate parameters `m` (eq. 10-11)."""
    m = m.clamp(M_MIN + _EPS, M_MAX - _EPS)
    s = torch.sigmoid((torch.log(m + 0.5) - torch.log(1.0 - m + 0.5) + cfg.lam) / cfg.alpha)
    return (s * (cfg.high - cfg.low) + cfg.low).clamp(0.0, 1.0)


def relaxed_mask(m: torch.Tensor, cfg: GateConfig = GateConfig()) -> torch.Tensor:
    """sigma_hat(M) = sigmoid(0.4 M + 1): the smooth stand-in for the gate used only in the L1 penalty."""
    return torch.sigmoid(m * cfg.l1_scale + cfg.l1_shift)
