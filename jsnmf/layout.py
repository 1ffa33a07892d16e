"""Names shared by the whole package: hook names and the layout of a run folder.

A run folder (``jsnmf run``; ``jsnmf extract/fit/report`` step by step) holds::

    store/                          the ActivationStore (jsnmf.store)
    snmf/layer_{L:02d}/             the fitted SNMF of layer L (SNMF.save)
    snmf/layer_{L:02d}.fitting/     its fit checkpoints while it runs (removed once saved)
    report/index.html               the report (jsnmf.report)
    report/layer_{L:02d}/           report.html, features.json, loss.png, codes.png
    evaluation.json                 ``jsnmf evaluate``: detection and steering (jsnmf.evaluation.run)
    export/layer_{L:02d}/           ``jsnmf export``: features.safetensors + cfg.json (jsnmf.io.export)

Paths the store records (model, tokenizer) are relative to the run folder when they lie in it, so the
folder can be moved or shared.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HOOK_SITES", "STEERING_SITES", "hook_width", "hook_name", "parse_hook_name", "layer_dir_name", "RunLayout"]

# The capture points, by TransformerLens' names: the MLP's hidden activation (where the paper's ``F``
# lives, width d_mlp), what the MLP writes to the residual stream (``hook_mlp_out``, d_model; after
# Gemma 2/3's post-feed-forward norm, with GPT-2's output bias) and the residual stream after the
# block (``hook_resid_post``, d_model: transformers' ``hidden_states[L + 1]``, before the final norm).
HOOK_SITES = ("hook_post", "hook_mlp_out", "hook_resid_post")
STEERING_SITES = ("hook_post", "hook_mlp_out")  # where models.Steering adds a direction
_HOOK = re.compile(r"blocks\.(\d+)\.(mlp\.hook_post|hook_mlp_out|hook_resid_post)")


def hook_name(layer: int, site: str = "hook_post") -> str:
    """The ecosystem's name of ``site`` at ``layer``: ``blocks.{L}.mlp.hook_post`` (the MLP
    activation), ``blocks.{L}.hook_mlp_out`` or ``blocks.{L}.hook_resid_post``."""
    if site not in HOOK_SITES:
        raise ValueError(f"hook site must be one of {HOOK_SITES}, got {site!r}")
    return f"blocks.{int(layer)}.mlp.hook_post" if site == "hook_post" else f"blocks.{int(layer)}.{site}"


def parse_hook_name(name: str) -> tuple[int, str]:
    """``"blocks.3.hook_mlp_out"`` → ``(3, "hook_mlp_out")``; ``"blocks.3.mlp.hook_post"`` → ``(3, "hook_post")``."""
    match = _HOOK.fullmatch(name)
    if not match:
        raise ValueError(f"unknown hook {name!r}; expected 'blocks.{{L}}.mlp.hook_post', 'blocks.{{L}}.hook_mlp_out' "
                         "or 'blocks.{L}.hook_resid_post'")
    return int(match[1]), match[2].removeprefix("mlp.")


def hook_width(site: str, d_mlp: int, d_model: int) -> int:
    """Values per token at ``site``: d_mlp at ``hook_post``, d_model at the residual-stream sites."""
    if site not in HOOK_SITES:
        raise ValueError(f"hook site must be one of {HOOK_SITES}, got {site!r}")
    return int(d_mlp) if site == "hook_post" else int(d_model)


def layer_dir_name(layer: int) -> str:
    """``layer_{L:02d}``: the name of a layer's folder in the store, the checkpoints and the report."""
    return f"layer_{int(layer):02d}"


@dataclass(frozen=True)
class RunLayout:
    """Where each part of a run lives under ``root``."""

    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike) -> "RunLayout":
        return cls(Path(root))

    @classmethod
    def of_store(cls, store_dir: str | os.PathLike) -> "RunLayout":
        """The run a store folder belongs to (its parent)."""
        return cls(Path(store_dir).parent)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def snmf(self) -> Path:
        return self.root / "snmf"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    def fitted(self, layer: int, snmf_dir: Path | None = None) -> Path:
        """The saved SNMF of ``layer``."""
        return (snmf_dir or self.snmf) / layer_dir_name(layer)

    def fitting(self, layer: int, snmf_dir: Path | None = None) -> Path:
        """The checkpoint folder of ``layer``'s fit while it runs."""
        return (snmf_dir or self.snmf) / f"{layer_dir_name(layer)}.fitting"

    def report_layer(self, layer: int, report_dir: Path | None = None) -> Path:
        return (report_dir or self.report) / layer_dir_name(layer)
