"""Directions of the demo model's planted concepts (see jsnmf.demo)."""
import numpy as np


def planted_direction(model, planted, layer, concept):
    """The indicator of ``concept``'s planted neuron group at ``layer`` (d_mlp,)."""
    v = np.zeros(model.config.d_mlp, np.float32)
    v[planted["layers"][str(layer)][concept]] = 1.0
    return v
