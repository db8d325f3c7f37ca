"""Split-conformal ranks, shared by the prediction sets (``training.conformal``) and the
out-of-distribution threshold (``training.ood``). Torch-free.

The r-th smallest of n exchangeable calibration scores covers a new score with probability
r / (n + 1) on average over calibration draws; for one given draw its coverage is
Beta(r, n + 1 - r), so P(coverage >= level) = P(Binomial(n, level) <= r - 1)
(a training-conditional guarantee, Vovk 2012).
"""

from __future__ import annotations

import math


def _log_comb(n: int, k: int) -> float:
    # In log space: the binomial coefficient overflows a float past n ~ 1000.
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def conformal_rank(n: int, level: float) -> int:
    """ceil((n + 1) level): the rank that covers ``level`` on average (n + 1 when n is too
    small for it)."""
    # (n + 1) * level can land a hair above an integer in floating point (70 * 0.9).
    return min(math.ceil((n + 1) * level - 1e-9), n + 1)


def confident_rank(n: int, level: float, confidence: float) -> int:
    """The smallest rank r whose r-th smallest of n scores covers ``level`` with probability
    ``confidence`` over the calibration draw (n + 1 when no rank does)."""
    below = 0.0  # P(Binomial(n, level) <= r - 1), accumulated term by term
    log_p, log_q = math.log(level), math.log1p(-level)
    for r in range(1, n + 1):
        k = r - 1
        below += math.exp(_log_comb(n, k) + k * log_p + (n - k) * log_q)
        if below >= confidence:
            return r
    return n + 1


def exceed_tail(n: int, passed: int, m: int, k: int) -> float:
    """P(at least ``k`` of ``m`` new inputs land above a threshold that ``passed`` of ``n``
    calibration scores were at or below), where the new and the calibration scores are
    exchangeable (distinct scores). The threshold's pass rate is Beta(passed, n + 1 - passed)
    over the calibration draw, so the count above it is beta-binomial: a new split's flagged
    share, judged against what the calibration split's own draw allows."""
    a, b = n + 1 - passed, passed  # Beta parameters of the share above the threshold
    if k <= 0:
        return 1.0

    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    base = log_beta(a, b)
    total = 0.0
    for x in range(k, m + 1):
        total += math.exp(_log_comb(m, x) + log_beta(x + a, m - x + b) - base)
    return min(total, 1.0)


def binomial_at_most(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) <= k): how often a rate of ``p`` shows ``k`` or fewer of ``n``."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(
        sum(math.exp(_log_comb(n, i) + i * log_p + (n - i) * log_q) for i in range(k + 1)), 1.0
    )
