"""The behaviour every port shares: input checks, the jitted forward with capture/steering/early stop,
the KV-cached step used by generation, and the vocabulary projection of MLP directions."""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig
from .layers import AttentionMasks, build_masks
from jsnmf.layout import parse_hook_name

from .outputs import ModelOutput, hook_name
from .steering import Steering, SteeringPlan, apply_steering, build_plan


class CausalLM(nnx.Module):
    """Base class of the ports. Subclasses define ``embed``, ``block``, ``mlp_output``, ``final_logits``
    (the traced pieces) and ``checkpoint_names`` / ``canonical_name`` / ``tied_embedding_matrix`` (used by
    the loader); parameters are ``nnx.Param`` attributes in the checkpoint's layout."""

    config: ModelConfig

    # ---- implemented by each family -------------------------------------------------------------
    def embed(self, ids: jax.Array, positions: jax.Array) -> jax.Array:
        raise NotImplementedError

    def block(self, layer, x, positions, masks: AttentionMasks, plan, kv, start, mlp_only_tail=False):
        """Run one block. Returns ``(x, h, kv)``: the new residual, the MLP activation after steering,
        the updated (k, v) cache (None without a cache). With ``mlp_only_tail`` the block may stop after
        computing ``h`` (the residual is then not needed)."""
        raise NotImplementedError

    def mlp_output(self, layer: int, h: jax.Array) -> jax.Array:
        """What the MLP adds to the residual stream for activation ``h``, without any bias."""
        raise NotImplementedError

    def mlp_output_bias(self, layer: int) -> jax.Array | None:
        """The MLP output's bias (GPT-2's ``c_proj.bias``), None for families without one."""
        return None

    def mlp_out(self, layer: int, h: jax.Array) -> jax.Array:
        """``blocks.{L}.hook_mlp_out``: what the MLP adds to the residual stream, bias included."""
        out = self.mlp_output(layer, h)
        bias = self.mlp_output_bias(layer)
        return out if bias is None else out + bias

    def final_logits(self, x: jax.Array) -> jax.Array:
        """Final norm, unembedding (and Gemma 2's final soft-cap)."""
        raise NotImplementedError

    # ---- the traced computation -----------------------------------------------------------------
    def run(
        self,
        ids: jax.Array,
        positions: jax.Array,
        masks: AttentionMasks,
        plan: SteeringPlan | None,
        capture: tuple[tuple[int, str], ...],
        n_run: int,
        want_logits: bool,
        cache: tuple | None = None,
        start: jax.Array | int = 0,
        last_logits_only: bool = False,
    ):
        """Embed, run blocks ``0..n_run-1``, optionally unembed (only the last column with
        ``last_logits_only``). ``capture``: ``(layer, site)`` pairs. Traced under jit; returns
        ``(logits | None, {(layer, site): value}, new_cache | None)``."""
        x = self.embed(ids, positions)
        acts, new_cache = {}, []
        for i in range(n_run):
            kv = None if cache is None else cache[i]
            residual_site = (i, "hook_mlp_out") in capture or (i, "hook_resid_post") in capture
            skip_tail = i == n_run - 1 and not want_logits and cache is None and not residual_site
            x, h, kv = self.block(i, x, positions, masks, plan, kv, start, mlp_only_tail=skip_tail)
            if (i, "hook_mlp_out") in capture:  # recomputed from h: the blocks keep no copy of it
                acts[(i, "hook_mlp_out")] = apply_steering(self.mlp_out(i, h), plan, i, site="hook_mlp_out")
            # hook_mlp_out steering: the MLP output's only consumer is the residual add, so adding there
            # is adding to the residual right after the block (families need no hook of their own)
            x = apply_steering(x, plan, i, site="hook_mlp_out")
            if (i, "hook_post") in capture:
                acts[(i, "hook_post")] = h
            if (i, "hook_resid_post") in capture:
                acts[(i, "hook_resid_post")] = x
            new_cache.append(kv)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.final_logits(x) if want_logits else None
        return logits, acts, (tuple(new_cache) if cache is not None else None)

    # ---- the public forward -----------------------------------------------------------------------
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        capture: Iterable[int | str] = (),
        steering: Steering | Sequence[Steering] | None = None,
        stop_at_layer: int | None = None,
    ) -> ModelOutput:
        """Forward pass over a (padded) batch.

        ``input_ids`` [batch, seq] ints (NumPy or JAX); ``attention_mask`` [batch, seq] of 0/1 (left or
        right padding; positions are ``cumsum(mask) - 1``). ``capture``: layers (ints: their MLP
        activation, ``blocks.{l}.mlp.hook_post``) or TransformerLens hook names
        (``blocks.{l}.mlp.hook_post``, ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post``)
        to return (``out.mlp_activations[l]`` for hook_post, ``out.activations[name]`` for every one). ``steering``: one ``Steering`` or a
        list (at ``hook_post`` or ``hook_mlp_out``; see ``jsnmf.models.steering``). ``stop_at_layer=L``
        runs only blocks ``0..L-1`` and skips the unembedding (``logits`` is None); captured layers must
        then be ``< L``. Compiled once per (batch, seq), capture set,
        steering structure and ``stop_at_layer``.
        """
        cfg = self.config
        ids, mask = check_inputs(input_ids, attention_mask, cfg)
        sites = normalize_capture(capture, cfg.n_layers)
        if stop_at_layer is None:
            n_run, want_logits = cfg.n_layers, True
        else:
            if not isinstance(stop_at_layer, (int, np.integer)) or not 0 < stop_at_layer <= cfg.n_layers:
                raise ValueError(f"stop_at_layer must be an int in [1, {cfg.n_layers}], got {stop_at_layer!r}")
            n_run, want_logits = int(stop_at_layer), False
            late = sorted({l for l, _ in sites if l >= n_run})
            if late:
                raise ValueError(f"captured layers {late} are not run with stop_at_layer={n_run}")
        plan = build_plan(steering, cfg, ids.shape[0], ids.shape[1], self.dtype)
        logits, acts = _forward_jit(self, ids, mask, plan, sites, n_run, want_logits)
        return ModelOutput(logits=logits,
                           mlp_activations={l: v for (l, s), v in acts.items() if s == "hook_post"},
                           activations={hook_name(l, s): acts[(l, s)] for l, s in sites})

    @property
    def dtype(self):
        """The parameter dtype (float32 or bfloat16)."""
        return self.param_dtype

    # ---- vocabulary projection ----------------------------------------------------------------------
    def project_to_vocab(self, layer: int, directions, site: str = "hook_post") -> jax.Array:
        """Logits [k, vocab] of feature directions ``directions`` [width, k] taken at ``site``.

        Each column is unit-normalised. At ``hook_post`` (neuron space, d_mlp) it is pushed through
        layer ``layer``'s MLP output weights (no bias; Gemma 2 then applies its post-feed-forward norm),
        as the paper reads features out in vocabulary space; at ``hook_mlp_out`` and
        ``hook_resid_post`` (d_model) it already lives in the residual stream. Then the final norm and
        the unembedding (and Gemma 2's final soft-cap).
        """
        cfg = self.config
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < cfg.n_layers:
            raise ValueError(f"layer must be an int in [0, {cfg.n_layers}), got {layer!r}")
        width, name = (cfg.d_mlp, "d_mlp") if site == "hook_post" else (cfg.d_model, "d_model")
        hook_name(layer, site)  # a known site, or ValueError
        d = np.asarray(jax.device_get(directions), dtype=np.float32)
        if d.ndim == 1:
            d = d[:, None]
        if d.ndim != 2 or d.shape[0] != width:
            raise ValueError(f"directions at {site} must have shape ({name}={width}, k), got {np.shape(directions)}")
        norms = np.linalg.norm(d, axis=0)
        if not np.all(np.isfinite(d)) or np.any(norms == 0):
            bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0)).tolist()
            raise ValueError(f"directions columns {bad} are zero or non-finite; cannot unit-normalise them")
        unit = jnp.asarray((d / norms).T, dtype=self.dtype)  # [k, d_mlp]
        # The per-layer part runs op by op, so the jitted tail compiles once for every layer.
        resid = self.mlp_output(int(layer), unit[None]) if site == "hook_post" else unit[None]  # [1, k, d_model]
        return _final_logits_jit(self, resid)[0]

    # ---- KV cache -------------------------------------------------------------------------------
    def init_cache(self, batch: int, length: int) -> tuple:
        """An empty KV cache: per layer ``(k, v)`` of shape [batch, length, n_kv_heads, head_dim]."""
        cfg = self.config
        shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(cfg.n_layers))

    def cached_step(self, ids, positions, cache, cache_valid, start, plan):
        """Traced: run ``ids`` [B, T] written at cache slots ``start..start+T-1``; ``cache_valid`` [B, S]
        marks real tokens among all slots (already including these). Returns (logits of the last
        column [B, 1, V], new cache)."""
        cfg = self.config
        query_slots = start + jnp.arange(ids.shape[1])
        window = cfg.sliding_window if any(cfg.sliding_layers) else None
        masks = build_masks(query_slots, cache_valid, window)
        logits, _, cache = self.run(ids, positions, masks, plan, (), cfg.n_layers, True, cache=cache, start=start,
                                    last_logits_only=True)
        return logits, cache


def check_inputs(input_ids, attention_mask, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Validate ids/mask on the host (JAX gathers would clamp bad ids silently) → int32 JAX arrays."""
    ids = np.asarray(jax.device_get(input_ids))
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seq) with both > 0, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"input_ids out of range [0, {cfg.vocab_size}): min {ids.min()}, max {ids.max()}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(jax.device_get(attention_mask))
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must contain only 0 and 1")
    if cfg.use_learned_positions and ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds n_positions={cfg.max_position_embeddings}")
    return _int32_on_device(input_ids, ids), _int32_on_device(attention_mask, mask)


def _int32_on_device(given, host: np.ndarray) -> jax.Array:
    """``given`` itself when it is already an int32 JAX array (it keeps its placement, e.g. rows split over a
    mesh, and the forward runs where it lies); else ``host`` as an int32 array on the default device."""
    if isinstance(given, jax.Array) and given.dtype == jnp.int32:
        return given
    return jnp.asarray(host, jnp.int32)


def normalize_capture(capture: Iterable[int | str], n_layers: int) -> tuple[tuple[int, str], ...]:
    """Capture spec (ints: the layer's ``hook_post``; or hook names ``blocks.{l}.mlp.hook_post``,
    ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post``) → sorted unique ``(layer, site)``."""
    if isinstance(capture, (int, str, np.integer)):
        capture = [capture]
    sites = set()
    for item in capture:
        if isinstance(item, str):
            try:
                layer, site = parse_hook_name(item)
            except ValueError:
                raise ValueError(f"unknown hook name {item!r}; expected 'blocks.{{layer}}.mlp.hook_post', "
                                 f"'blocks.{{layer}}.hook_mlp_out' or 'blocks.{{layer}}.hook_resid_post' "
                                 f"with layer < {n_layers}") from None
            if layer >= n_layers:
                raise ValueError(f"hook {item!r}: layer {layer} out of range [0, {n_layers})")
            sites.add((layer, site))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < n_layers:
                raise ValueError(f"capture layer {item} out of range [0, {n_layers})")
            sites.add((int(item), "hook_post"))
        else:
            raise ValueError(f"capture entries must be ints or hook names, got {item!r}")
    return tuple(sorted(sites))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("capture", "n_run", "want_logits"))
def _forward_jit(model: CausalLM, ids, mask, plan, capture, n_run, want_logits):
    cfg = model.config
    positions = positions_from_mask(mask)
    window = cfg.sliding_window if any(cfg.sliding_layers[:n_run]) else None
    masks = build_masks(jnp.arange(ids.shape[1]), mask, window)
    logits, acts, _ = model.run(ids, positions, masks, plan, capture, n_run, want_logits)
    return logits, acts


@jax.jit
def _final_logits_jit(model: CausalLM, resid):
    return model.final_logits(resid)
