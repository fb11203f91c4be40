"""Pallas kernels for the hot operations, each beside the jnp reference that specifies it.

Installed as ``mlsys_jax.kernels``; imports nothing from the layers above it.
"""
