"""Model family: ViT encoder, connector, decoder LLM, the multimodal model."""

from flax import nnx

# Params carry *logical* axis names (`embed`, `mlp`, ...) in `out_sharding`; the trainer
# maps them to mesh axes itself (mm15_jax/sharding.py), so Flax must not try to shard
# variables eagerly from those names.
nnx.use_eager_sharding(False)
