"""Pure JAX SNMF kernels: initializers, update steps, sparsification, loss from statistics, fit drivers."""
