"""Steering: add a direction to the model at one of two hook sites, in the jitted forward and in generation.

Sites (named as in TransformerLens):

- ``hook_post`` (``blocks.{layer}.mlp.hook_post``): the MLP's hidden activation, the input of the
  down-projection, ``d_mlp`` wide. This is neuron space, where SNMF's features ``F`` live.
- ``hook_mlp_out`` (``blocks.{layer}.hook_mlp_out``): what the MLP writes to the residual stream,
  ``d_model`` wide: the down-projection (with its bias, GPT-2) and, in Gemma 2/3, the
  post-feed-forward norm. The residual stream is its only consumer, so adding ``u`` here is adding
  ``u`` to the residual stream right after the block; that is how it is implemented.

Modes, applied at every position or at chosen ones:

- ``"add"`` (the paper's intervention): ``h ← h + alpha · v̂`` with ``v̂ = v / ‖v‖``, so ``alpha`` is a
  length in activation units whatever the scale of ``v`` (SNMF feature columns have norms in the tens,
  token activations norms of a few units). ``normalize=False`` adds the raw ``alpha · v``.
  ``alpha = 0`` leaves the model exactly unsteered.
- ``"replace"`` (not used by the paper; ``hook_post`` only): ``h ← h − (h·v̂) v̂ + alpha · v̂``. The
  projection of ``h`` on the line through ``v`` is replaced by ``alpha · v̂`` and everything orthogonal
  to ``v`` is kept, so afterwards ``h · v̂ = alpha`` exactly. With ``normalize=False`` the new projection is
  ``alpha · v`` instead (``h · v̂ = alpha · ‖v‖``). This sets a coordinate along one direction; it does
  not set an SNMF code ``G[:, j]``, because features are not orthogonal to each other.

Several ``Steering`` entries may target the same or different layers and sites; entries of one
(layer, site) are applied in the order given, ``hook_post`` before ``hook_mlp_out`` of the same layer.
Inside the jitted forward the vectors, alphas and position masks are traced arguments: only the
(layer, site, mode) structure is static, so a new vector or alpha does not recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsnmf.layout import STEERING_SITES, hook_name, parse_hook_name

MODES = ("add", "replace")
SITES = STEERING_SITES


@dataclasses.dataclass(frozen=True, eq=False)
class Steering:
    """One steering intervention (see the module docstring for the sites and modes).

    ``layer``: the block index, or a full hook name (``"blocks.5.hook_mlp_out"``), which also sets ``site``.
    ``vector``: length ``d_mlp`` at ``hook_post``, ``d_model`` at ``hook_mlp_out``; any norm.
    ``alpha``: the length added along ``v̂`` (add) or the new component along ``v̂`` (replace).
    ``positions``: None for every position; a sequence of column indices of ``input_ids`` (negative
    counts from the end; same for every row); or a boolean array [seq] or [batch, seq].
    ``mode``: ``"add"`` or ``"replace"``. ``site``: ``"hook_post"`` or ``"hook_mlp_out"``.
    ``normalize``: use ``v / ‖v‖`` (default, as the paper); False uses the vector as given.
    """

    layer: int
    vector: object
    alpha: float = 1.0
    positions: object = None
    mode: str = "add"
    site: str = "hook_post"
    normalize: bool = True

    def __post_init__(self):
        if isinstance(self.layer, str):
            layer, site = parse_hook_name(self.layer)
            if self.site != "hook_post" and self.site != site:
                raise ValueError(f"Steering hook {self.layer!r} contradicts site={self.site!r}")
            object.__setattr__(self, "layer", layer)
            object.__setattr__(self, "site", site)
        if self.mode not in MODES:
            raise ValueError(f"Steering.mode must be one of {MODES}, got {self.mode!r}")
        if self.site not in SITES:
            raise ValueError(f"Steering.site must be one of {SITES}, got {self.site!r}")
        if self.mode == "replace" and self.site != "hook_post":
            raise ValueError("replace mode is only supported at hook_post")
        if not isinstance(self.layer, (int, np.integer)) or isinstance(self.layer, bool):
            raise ValueError(f"Steering.layer must be an int or a hook name, got {self.layer!r}")

    @property
    def hook(self) -> str:
        """The hook name of this intervention's site, e.g. ``blocks.5.mlp.hook_post``."""
        return hook_name(self.layer, self.site)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SteeringPlan:
    """Steering as jit arguments: static (layer, site, mode) per entry; traced vectors, alphas and masks.

    ``vectors``: one array per entry ([d_mlp] or [d_model], already unit-normalised where asked);
    ``alphas`` [n]; ``masks`` [n, B, T] (1.0 where steered).
    """

    vectors: tuple
    alphas: jax.Array
    masks: jax.Array
    layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    modes: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())
    sites: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())

    def entries_for(self, layer: int, site: str = "hook_post") -> list[int]:
        """Indices of the entries acting on ``layer`` at ``site``."""
        return [j for j, (l, s) in enumerate(zip(self.layers, self.sites)) if l == layer and s == site]


def _position_mask(positions, batch: int, seq: int) -> np.ndarray:
    if positions is None:
        return np.ones((batch, seq), np.float32)
    arr = np.asarray(positions)
    if arr.dtype == bool:
        if arr.shape == (seq,):
            arr = np.broadcast_to(arr, (batch, seq))
        if arr.shape != (batch, seq):
            raise ValueError(f"Steering.positions boolean mask has shape {arr.shape}, expected ({seq},) or ({batch}, {seq})")
        return arr.astype(np.float32)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"Steering.positions must be None, a list of column indices or a boolean mask, got {positions!r}")
    if arr.size and (arr.max() >= seq or arr.min() < -seq):
        raise ValueError(f"Steering.positions {arr.tolist()} out of range for sequence length {seq}")
    mask = np.zeros((batch, seq), np.float32)
    mask[:, arr % seq] = 1.0
    return mask


def build_plan(
    steering: Steering | Sequence[Steering] | None,
    config,
    batch: int,
    seq: int,
    dtype,
) -> SteeringPlan | None:
    """Validate user steering against ``config`` (a ``ModelConfig``) and turn it into a ``SteeringPlan``
    for a [batch, seq] input."""
    if steering is None:
        return None
    items = [steering] if isinstance(steering, Steering) else list(steering)
    if not items:
        return None
    widths = {"hook_post": config.d_mlp, "hook_mlp_out": config.d_model}
    vectors, alphas, masks = [], [], []
    for s in items:
        if not isinstance(s, Steering):
            raise ValueError(f"steering must be Steering objects, got {type(s).__name__}")
        if not 0 <= s.layer < config.n_layers:
            raise ValueError(f"Steering.layer {s.layer} out of range [0, {config.n_layers})")
        # float64 on the host, so the unit direction is exact before the cast to the model dtype
        vec = np.asarray(jax.device_get(s.vector), dtype=np.float64)
        width = widths[s.site]
        if vec.shape != (width,):
            raise ValueError(f"Steering.vector for {s.hook} has shape {vec.shape}, expected ({width},)")
        if not np.all(np.isfinite(vec)) or not np.isfinite(float(s.alpha)):
            raise ValueError(f"Steering for {s.hook} has a non-finite vector or alpha")
        norm = float(np.linalg.norm(vec))
        if s.normalize or s.mode == "replace":
            if norm == 0.0:
                raise ValueError(f"Steering.vector for {s.hook} is zero; it has no direction to normalise "
                                 "(normalize=False adds a raw vector)")
        if s.normalize:
            vec = vec / norm
        vectors.append(vec)
        alphas.append(float(s.alpha))
        masks.append(_position_mask(s.positions, batch, seq))
    return SteeringPlan(
        vectors=tuple(jnp.asarray(v, dtype=dtype) for v in vectors),
        alphas=jnp.asarray(np.asarray(alphas, np.float32), dtype=dtype),
        masks=jnp.asarray(np.stack(masks), dtype=dtype),
        layers=tuple(int(s.layer) for s in items),
        modes=tuple(s.mode for s in items),
        sites=tuple(s.site for s in items),
    )


def apply_steering(h: jax.Array, plan: SteeringPlan | None, layer: int, site: str = "hook_post") -> jax.Array:
    """Apply the plan's entries for (``layer``, ``site``) to ``h`` [B, T, width].

    At ``hook_post`` ``h`` is the MLP activation; at ``hook_mlp_out`` the caller passes the residual
    stream right after the block (see the module docstring)."""
    if plan is None:
        return h
    for j in plan.entries_for(layer, site):
        v, alpha, mask = plan.vectors[j], plan.alphas[j], plan.masks[j][..., None]
        if plan.modes[j] == "add":
            h = h + mask * (alpha * v)
        else:  # replace: the projection on the line through v becomes alpha·v (v unit unless normalize=False)
            unit = v / jnp.linalg.norm(v)
            component = jnp.einsum("btf,f->bt", h, unit)[..., None]
            h = h + mask * (alpha * v - component * unit)
    return h


def feature_to_mlp_out(model, layer: int, vector) -> np.ndarray:
    """The paper's map of a neuron-space feature to the residual site ``hook_mlp_out``, unit length.

    ``vector`` ([d_mlp], e.g. a column of ``F``, used as given like the paper's raw ``f``) goes through
    layer ``layer``'s down-projection and, in Gemma 2/3, its post-feed-forward norm; the result is
    normalised. The down-projection's bias (GPT-2 only) is left out: it is a constant offset, not part
    of the feature's direction (Gemma has none, so this is the paper's map there). Steering with
    ``Steering(layer, u, alpha, site="hook_mlp_out")`` then adds ``alpha · u`` to the MLP output.
    Returns float32 [d_model].
    """
    cfg = model.config
    if not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be an int in [0, {cfg.n_layers}), got {layer!r}")
    vec = np.asarray(jax.device_get(vector), dtype=np.float32)
    if vec.shape != (cfg.d_mlp,) or not np.all(np.isfinite(vec)):
        raise ValueError(f"vector must be finite with shape ({cfg.d_mlp},), got shape {vec.shape}")
    out = np.asarray(model.mlp_output(int(layer), jnp.asarray(vec, model.dtype)[None, None]), np.float64)[0, 0]
    norm = float(np.linalg.norm(out))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError(f"the feature maps to a zero (or non-finite) MLP output at layer {layer}")
    return (out / norm).astype(np.float32)
