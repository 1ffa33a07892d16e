"""Steering of MLP activations (the input of the down-projection, hook ``blocks.{layer}.mlp.hook_post``).

Two modes, applied at every position or at chosen ones:

- ``"add"``: ``h ← h + alpha · v``. ``alpha = 0`` leaves the model exactly unsteered.
- ``"replace"`` (the paper's intervention that *sets* a feature's strength): with ``v̂ = v / ‖v‖``,
  ``h ← h − (h·v̂) v̂ + alpha · v̂``, i.e. the component of ``h`` along ``v̂`` becomes exactly ``alpha``
  and everything orthogonal to ``v̂`` is kept.

Several ``Steering`` entries may target the same or different layers; entries of one layer are applied
in the order given. Inside the jitted forward the vectors, alphas and position masks are traced
arguments: only the (layer, mode) structure is static, so a new vector or alpha does not recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("add", "replace")


@dataclasses.dataclass(frozen=True, eq=False)
class Steering:
    """One steering intervention on layer ``layer``'s MLP activation.

    ``vector``: length ``d_mlp``. ``alpha``: the scale (add) or the target component (replace).
    ``positions``: None for every position; a sequence of column indices of ``input_ids`` (negative
    counts from the end; same for every row); or a boolean array [seq] or [batch, seq].
    ``mode``: ``"add"`` or ``"replace"`` (see the module docstring).
    """

    layer: int
    vector: object
    alpha: float = 1.0
    positions: object = None
    mode: str = "add"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Steering.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.layer, (int, np.integer)) or isinstance(self.layer, bool):
            raise ValueError(f"Steering.layer must be an int, got {self.layer!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SteeringPlan:
    """Steering as jit arguments: static (layer, mode) per entry; traced vectors, alphas and masks.

    ``vectors`` [n, d_mlp], ``alphas`` [n], ``masks`` [n, B, T] (1.0 where steered).
    """

    vectors: jax.Array
    alphas: jax.Array
    masks: jax.Array
    layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    modes: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())

    def entries_for(self, layer: int) -> list[int]:
        """Indices of the entries acting on ``layer``."""
        return [j for j, l in enumerate(self.layers) if l == layer]


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
    n_layers: int,
    d_mlp: int,
    batch: int,
    seq: int,
    dtype,
) -> SteeringPlan | None:
    """Validate user steering and turn it into a ``SteeringPlan`` for a [batch, seq] input."""
    if steering is None:
        return None
    items = [steering] if isinstance(steering, Steering) else list(steering)
    if not items:
        return None
    vectors, alphas, masks = [], [], []
    for s in items:
        if not isinstance(s, Steering):
            raise ValueError(f"steering must be Steering objects, got {type(s).__name__}")
        if not 0 <= s.layer < n_layers:
            raise ValueError(f"Steering.layer {s.layer} out of range [0, {n_layers})")
        vec = np.asarray(s.vector, dtype=np.float32)
        if vec.shape != (d_mlp,):
            raise ValueError(f"Steering.vector for layer {s.layer} has shape {vec.shape}, expected ({d_mlp},)")
        if not np.all(np.isfinite(vec)) or not np.isfinite(float(s.alpha)):
            raise ValueError(f"Steering for layer {s.layer} has a non-finite vector or alpha")
        if s.mode == "replace":
            norm = float(np.linalg.norm(vec))
            if norm == 0.0:
                raise ValueError(f"Steering.vector for layer {s.layer} is zero; replace mode needs a direction")
            vec = vec / norm
        vectors.append(vec)
        alphas.append(float(s.alpha))
        masks.append(_position_mask(s.positions, batch, seq))
    return SteeringPlan(
        vectors=jnp.asarray(np.stack(vectors), dtype=dtype),
        alphas=jnp.asarray(np.asarray(alphas, np.float32), dtype=dtype),
        masks=jnp.asarray(np.stack(masks), dtype=dtype),
        layers=tuple(int(s.layer) for s in items),
        modes=tuple(s.mode for s in items),
    )


def apply_steering(h: jax.Array, plan: SteeringPlan | None, layer: int) -> jax.Array:
    """Apply the plan's entries for ``layer`` to the MLP activation ``h`` [B, T, d_mlp]."""
    if plan is None:
        return h
    for j in plan.entries_for(layer):
        v, alpha, mask = plan.vectors[j], plan.alphas[j], plan.masks[j][..., None]
        if plan.modes[j] == "add":
            h = h + mask * (alpha * v)
        else:  # replace: v is unit-norm already
            component = jnp.einsum("btf,f->bt", h, v)[..., None]
            h = h + mask * ((alpha - component) * v)
    return h
