"""Flax NNX ports of GPT-2, Gemma 2 and Llama 3.1 that emit (and steer) MLP activations."""
