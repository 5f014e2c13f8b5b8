"""Effective model complexity (Nakkiran et al. 2019, "Deep double descent", §2):

    EMC_{D,ε}(T) = max{ n : E_{S ~ Dⁿ}[ train error of T(S) ] ≤ ε },

the largest training-set size on which the training procedure T (model, optimizer, epochs,
everything) still reaches mean train error ≤ ε (the paper takes ε = 0.1). Their claim: test
error peaks where EMC ≈ n, the size actually trained on; a model far below or above is in the
under- or over-parameterised regime whatever its parameter count says.

Two ways in:

- :func:`emc_from_errors`: train errors already measured at several n (a grid), e.g. the runs
  of a sweep over ``data.n_train``. The answer is bracketed by the grid: the largest n that
  passes and the next one that fails; :attr:`EMC.estimate` interpolates where the error
  crosses ε on a log-n axis (train error grows roughly linearly in log n near the crossing).
- :func:`emc_search`: a callable n -> mean train error, searched by bisection over the integers
  (it assumes the error does not fall as n grows: a larger set is never easier to fit).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from regexp.errors import ConfigError

EPS = 0.1  # Nakkiran et al.'s threshold
N_KEY = "data.n_train"


def model_key(point: Dict[str, Any]) -> str:
    """A sweep point without its seed and training-set size: what one EMC belongs to."""
    return json.dumps({k: v for k, v in point.items() if k not in ("seed", N_KEY)}, sort_keys=True, default=str)


def lookup(table: Dict[str, Any], point: Dict[str, Any]) -> Any:
    """The entry of ``table`` (model key -> value) for a run's ``point``: its own key, or else the
    entry whose every key-value ``point`` shares (a run collected from its folder also carries
    the sweep's own overrides, ``+experiment=...``, which no model key holds); None if none."""
    own = model_key(point)
    if own in table:
        return table[own]
    for key, value in table.items():
        if all(point.get(k, object()) == v for k, v in json.loads(key).items()):
            return value
    return None


@dataclass(frozen=True)
class EMC:
    """EMC bracketed by measured sizes: ``lower`` ≤ EMC < ``upper``.

    ``lower`` is None when even the smallest n fails (EMC is below the grid); ``upper`` is None
    when the largest n passes (EMC is at least ``lower``: censored at the grid's end)."""
    lower: Optional[int]
    upper: Optional[int]
    estimate: Optional[float]  # the crossing of ε between lower and upper, on log n

    @property
    def censored(self) -> bool:
        """The grid does not bracket EMC (it lies beyond one of its ends)."""
        return self.lower is None or self.upper is None

    @property
    def value(self) -> Optional[int]:
        """The definition on the grid: the largest measured n whose error is ≤ ε."""
        return self.lower


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ConfigError(f"eps={eps!r} is invalid: expected a train error in [0, 1)")
    return float(eps)


def _check_n(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) and not (isinstance(n, float) and n.is_integer()):
        raise ConfigError(f"{name}={n!r} is invalid: expected a whole number of training examples >= 1")
    if n < 1:
        raise ConfigError(f"{name}={n!r} is invalid: expected a whole number of training examples >= 1")
    return int(n)


def _check_error(e, n: int) -> float:
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or not 0 <= e <= 1:
        raise ConfigError(f"train error {e!r} at n={n} is invalid: expected a number in [0, 1]")
    return float(e)


def emc_from_errors(errors: Dict[int, float], eps: float = EPS) -> EMC:
    """EMC from mean train errors measured at several sizes (``{n: error}``).

    ``lower`` is the largest n with error ≤ ε, as the definition reads; ``upper`` the smallest
    larger n, which by then must fail. A grid whose error dips back under ε after failing does
    not change ``lower`` (the definition takes the largest passing n)."""
    eps = _check_eps(eps)
    if not errors:
        raise ConfigError("errors is empty: expected train errors at one or more sizes n")
    table = {_check_n(n, "n"): _check_error(e, n) for n, e in errors.items()}
    sizes = sorted(table)
    passing = [n for n in sizes if table[n] <= eps]
    if not passing:
        return EMC(None, sizes[0], None)
    lower = passing[-1]
    above = [n for n in sizes if n > lower]
    if not above:
        return EMC(lower, None, None)
    upper = above[0]
    lo, hi = table[lower], table[upper]
    # lo ≤ ε < hi: the log-n position where the straight line through both points meets ε
    t = (eps - lo) / (hi - lo)
    estimate = math.exp(math.log(lower) + t * (math.log(upper) - math.log(lower)))
    return EMC(lower, upper, estimate)


def geometric_sizes(lo: int, hi: int, count: int) -> list:
    """``count`` whole sizes from ``lo`` to ``hi`` spaced evenly on a log axis (duplicates dropped)."""
    lo, hi = _check_n(lo, "lo"), _check_n(hi, "hi")
    if hi < lo:
        raise ConfigError(f"hi={hi} is invalid: expected hi >= lo={lo}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count={count!r} is invalid: expected an integer >= 1")
    if count == 1:
        return [hi]
    out = [round(lo * (hi / lo) ** (i / (count - 1))) for i in range(count)]
    return sorted(set(out))


def emc_search(train_error: Callable[[int], float], lo: int, hi: int, eps: float = EPS) -> EMC:
    """EMC of a procedure given as ``train_error(n)`` (its mean train error on n examples),
    found by bisection in [lo, hi]: O(log(hi − lo)) calls instead of one per n.

    Bisection needs the error not to fall as n grows; the answer is exact (``lower`` + 1 =
    ``upper``) unless EMC lies outside [lo, hi] (then :attr:`EMC.censored`)."""
    eps = _check_eps(eps)
    lo, hi = _check_n(lo, "lo"), _check_n(hi, "hi")
    if hi < lo:
        raise ConfigError(f"hi={hi} is invalid: expected hi >= lo={lo}")
    if _check_error(train_error(lo), lo) > eps:
        return EMC(None, lo, None)
    if _check_error(train_error(hi), hi) <= eps:
        return EMC(hi, None, None)
    good, bad = lo, hi  # invariant: error(good) ≤ ε < error(bad)
    while bad - good > 1:
        mid = (good + bad) // 2
        if _check_error(train_error(mid), mid) <= eps:
            good = mid
        else:
            bad = mid
    return EMC(good, bad, float(good))


def mean_errors(rows: Sequence[Dict], n_key: str = "n_train", error_key: str = "train_error") -> Dict[int, float]:
    """``{n: mean train error over the rows at n}`` from result rows (completed runs only)."""
    by_n: Dict[int, list] = {}
    for r in rows:
        if r.get("status") != "completed" or r.get(error_key) in ("", None) or r.get(n_key) in ("", None):
            continue
        by_n.setdefault(int(r[n_key]), []).append(float(r[error_key]))
    return {n: sum(v) / len(v) for n, v in by_n.items()}
