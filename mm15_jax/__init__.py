"""mm15_jax: pretrain and fine-tune MM1.5-style multimodal LLMs in JAX."""
