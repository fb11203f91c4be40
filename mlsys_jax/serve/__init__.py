"""Serving: generation from a trained model with a KV cache, under the plan it trained with."""

from mlsys_jax.serve.generate import MIN_BUCKET, Generator, bucket, generate, sample_next

__all__ = ["MIN_BUCKET", "Generator", "bucket", "generate", "sample_next"]
