"""Steering strength at a matched KL: the α at which steering moves the next-token distribution by a target.

The paper compares steering methods at equal effect on the model, not at equal α: for each target
τ it finds the α with ``KL(base ‖ steered) = τ``, where ``base`` and ``steered`` are the next-token
distributions at the prompt's last position, without and with ``α · v̂`` added at every position
(:class:`jsnmf.models.Steering`, unit direction). Its code bisects α over [1, 2000] assuming KL grows
with α and silently drops the targets it misses (``notes/ecosystem.md`` §4.4). Here:

1. **Bracket.** α grows geometrically from ``alpha_start`` (×``growth``) until KL reaches the largest
   target or ``alpha_max`` (the stated limit of the search) is hit. KL(0) = 0 exactly. The default
   limit follows the scale of what the steering is added to: ``ALPHA_MAX_SCALE`` (64) times the median
   norm over the prompt's tokens (BOS excluded) of the MLP activation (``hook_post``) or of the
   residual stream after the block (``hook_mlp_out``), and at least 4096. A fixed limit does not fit
   every model: Gemma-3-270M's residual stream has norms near 2·10⁴ at layer 15 (SmolLM2-135M's: ~180),
   so α = 4096 moves its next token by KL ≈ 0.1 only.
2. **Bisect.** For each target, the smallest evaluated α with KL ≥ τ and the largest evaluated α below
   it (KL < τ there) bracket a crossing; bisection keeps ``KL(lo) < τ ≤ KL(hi)``, so it converges to
   a crossing even where KL is not monotone in α, until ``|KL − τ| ≤ rtol · τ``.
3. **Report every target**: reached or not, the α and the KL there. A target above every KL seen up
   to ``alpha_max`` is unreachable (reported with the α of the largest KL seen); a target the KL jumps
   over (the bracket shrinks to nothing without meeting the tolerance) is reported with the α whose KL
   came closest.

Sign: α ≥ 0 along ``+v``. The opposite direction is a separate search with ``-v`` (its KL differs).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jsnmf.layout import hook_name
from jsnmf.models.steering import SITES, Steering

__all__ = ["DEFAULT_KL_TARGETS", "AlphaSearch", "KLTarget", "activation_scale", "alpha_for_kl", "kl_at",
           "next_token_kl"]

# The paper's targets (0.025 … 0.5, a subset) plus 1.0: models this small need more before text moves.
DEFAULT_KL_TARGETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The default search limit: this many times the typical norm of the activation the steering is added to.
ALPHA_MAX_SCALE = 64.0
ALPHA_MAX_FLOOR = 4096.0


def next_token_kl(base_logits, steered_logits) -> np.ndarray:
    """``KL(p ‖ q) = Σ p (log p − log q)`` per row of [..., vocab] logits, in float64 from log-softmax.

    (The paper adds 1e-8 inside both logs; exact log-probabilities need no such guard.)
    """
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(base_logits), log_softmax(steered_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)  # ≥ 0 up to rounding


@dataclasses.dataclass(frozen=True)
class KLTarget:
    """One target's outcome: ``alpha`` and ``kl`` are where the search ended (see the module docstring)."""

    target: float
    reached: bool
    alpha: float
    kl: float
    note: str = ""


@dataclasses.dataclass(frozen=True)
class AlphaSearch:
    """The result of ``alpha_for_kl``: one ``KLTarget`` per requested target (in the order given),
    every (α, KL) evaluated, and the search's settings."""

    layer: int
    site: str
    targets: tuple[KLTarget, ...]
    evaluations: tuple[tuple[float, float], ...]
    alpha_max: float
    rtol: float

    def alphas(self) -> dict[float, float]:
        """Target → α for the reached targets."""
        return {t.target: t.alpha for t in self.targets if t.reached}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _prompt(prompt_ids, attention_mask):
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [seq] or [batch, seq], got shape {np.shape(prompt_ids)}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape or (mask.sum(1) == 0).any():
        raise ValueError("attention_mask must match prompt_ids and keep at least one token per row")
    last = ids.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # each row's last real token
    return ids.astype(np.int32), mask, last


class _KLFunction:
    """KL(α), cached; every call is one forward with the same steering structure (one compile)."""

    def __init__(self, model, direction, site, layer, prompt_ids, attention_mask):
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        self.model, self.direction, self.site, self.layer = model, direction, site, int(layer)
        self.ids, self.mask, self.last = _prompt(prompt_ids, attention_mask)
        self.base = self._last_logits(0.0)  # α = 0 is exactly the unsteered model
        self.cache: dict[float, float] = {0.0: 0.0}

    def _last_logits(self, alpha: float) -> np.ndarray:
        steer = Steering(self.layer, self.direction, alpha=float(alpha), site=self.site)
        logits = np.asarray(self.model(self.ids, attention_mask=self.mask, steering=steer).logits)
        return logits[np.arange(len(self.ids)), self.last]

    def __call__(self, alpha: float) -> float:
        alpha = float(alpha)
        if alpha not in self.cache:
            kl = next_token_kl(self.base, self._last_logits(alpha)).mean()  # mean over prompts
            self.cache[alpha] = float(kl)
        return self.cache[alpha]


def activation_scale(model, site: str, layer: int, prompt_ids, attention_mask=None) -> float:
    """Median norm over the prompt's real tokens (the first position, usually BOS, left out) of what
    steering at ``site`` adds to: the MLP activation at ``hook_post``, the residual stream after the
    block at ``hook_mlp_out``."""
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    ids, mask, _ = _prompt(prompt_ids, attention_mask)
    name = hook_name(layer, "hook_post" if site == "hook_post" else "hook_resid_post")
    acts = np.asarray(model(ids, attention_mask=mask, capture=[name], stop_at_layer=int(layer) + 1)
                      .activations[name], np.float64)
    real = mask.astype(bool)
    if real.shape[1] > 1:
        real[:, 0] = False
    return float(np.median(np.linalg.norm(acts, axis=-1)[real]))


def kl_at(model, direction, site: str, layer: int, prompt_ids, alphas: Sequence[float],
          attention_mask=None) -> np.ndarray:
    """KL(base ‖ steered) of the next-token distribution at the prompt's last position, for each α
    (mean over the rows when ``prompt_ids`` holds several prompts)."""
    kl = _KLFunction(model, direction, site, layer, prompt_ids, attention_mask)
    return np.array([kl(a) for a in alphas])


def alpha_for_kl(model, direction, site: str, layer: int, prompt_ids,
                 targets: Sequence[float] = DEFAULT_KL_TARGETS, *, attention_mask=None, alpha_start: float = 1.0,
                 growth: float = 2.0, alpha_max: float | None = None, rtol: float = 0.02,
                 max_bisections: int = 60) -> AlphaSearch:
    """The steering strength α ≥ 0 at which ``KL(base ‖ steered)`` reaches each target (module docstring).

    ``direction``: the vector to steer along, any norm (steering adds ``α · v/‖v‖``), ``d_mlp`` wide at
    ``site="hook_post"``, ``d_model`` at ``"hook_mlp_out"``. ``prompt_ids``: one prompt [seq] (the paper:
    BOS + "I think that") or several [batch, seq] with ``attention_mask`` (KL is then their mean).
    Bracketing starts at ``alpha_start`` and multiplies by ``growth`` up to ``alpha_max`` (default: the
    scale of the steered activation, module docstring); bisection stops when ``|KL − τ| ≤ rtol · τ`` (at
    most ``max_bisections`` steps per target).
    """
    targets = [float(t) for t in targets]
    if not targets or any(not np.isfinite(t) or t <= 0 for t in targets):
        raise ValueError(f"targets must be positive KL values, got {targets}")
    kl = _KLFunction(model, direction, site, layer, prompt_ids, attention_mask)
    if alpha_max is None:
        alpha_max = max(ALPHA_MAX_FLOOR, ALPHA_MAX_SCALE * activation_scale(model, site, layer, prompt_ids,
                                                                             attention_mask))
    if not 0 < alpha_start <= alpha_max or growth <= 1 or not 0 < rtol < 1:
        raise ValueError("need 0 < alpha_start <= alpha_max, growth > 1 and 0 < rtol < 1")
    results = _search(kl, targets, float(alpha_start), float(growth), float(alpha_max), rtol, max_bisections)
    return AlphaSearch(layer=int(layer), site=site, targets=tuple(results),
                       evaluations=tuple(sorted(kl.cache.items())), alpha_max=float(alpha_max), rtol=float(rtol))


def _search(kl, targets, alpha_start, growth, alpha_max, rtol, max_bisections) -> list[KLTarget]:
    """Bracket then bisect. ``kl``: a callable α → KL that records every value in ``kl.cache``
    (holding ``{0.0: 0.0}`` at the start)."""
    # 1. bracket: grow α until the largest target is passed or alpha_max is reached
    alpha = alpha_start
    while kl(alpha) < max(targets) and alpha < alpha_max:
        alpha = min(alpha * growth, alpha_max)
    # 2. bisect per target, reusing every evaluation so far (later targets start from tighter brackets)
    return [_solve(kl, tau, rtol, max_bisections) for tau in targets]


def _solve(kl, tau: float, rtol: float, max_bisections: int) -> KLTarget:
    def close(a):
        return abs(kl.cache[a] - tau) <= rtol * tau

    hits = [a for a in sorted(kl.cache) if close(a)]
    if hits:
        return KLTarget(tau, True, hits[0], kl.cache[hits[0]])
    above = [a for a in sorted(kl.cache) if kl.cache[a] >= tau]
    if not above:
        best = max(kl.cache, key=lambda a: (kl.cache[a], -a))
        return KLTarget(tau, False, best, kl.cache[best],
                        f"unreachable: the largest KL seen for alpha <= {max(kl.cache):g} is {kl.cache[best]:.4g}")
    hi = above[0]
    lo = max(a for a in kl.cache if a < hi)  # KL(lo) < tau: hi is the first α at or above it
    for _ in range(max_bisections):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket cannot shrink further in float64
            break
        value = kl(mid)
        if abs(value - tau) <= rtol * tau:
            return KLTarget(tau, True, mid, value)
        lo, hi = (mid, hi) if value < tau else (lo, mid)
    best = min((lo, hi), key=lambda a: abs(kl.cache[a] - tau))
    return KLTarget(tau, False, best, kl.cache[best],
                    f"KL jumps from {kl.cache[lo]:.4g} to {kl.cache[hi]:.4g} between alpha {lo:.6g} and {hi:.6g}")
