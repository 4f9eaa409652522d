"""MM1.5: ViT image tiles -> connector tokens -> written into the text embedding -> decoder LLM."""

import jax.numpy as jnp
from flax import nnx

from mm15_jax import modes
from mm15_jax.models.connector import make_connector
from mm15_jax.models.llm import Decoder, DecoderOutput
from mm15_jax.models.vit import VisionTransformer
from mm15_jax.sharding import constrain


def normalize_pixels(images, mean, std):
  """uint8 pixels -> normalised floats (config.model.vit.image_mean/std, CLIP's by default); float
  input is taken as already normalised."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def position_grids(config) -> dict:
  """{param path: interpolation} of the learned position grids sized by `vit.image_size`: what a
  new stage at another image size resizes when it starts from a previous stage's params, with
  the interpolation the model itself applies at call time to other grids."""
  grids = {"vit/pos_embedding": modes.parse(modes.PosResize, config.vit.pos_resize).value}
  if modes.parse(modes.ConnectorKind, config.connector.kind) == modes.ConnectorKind.C_ABSTRACTOR:
    grids["connector/pos_embedding"] = modes.PosResize.BILINEAR.value  # CAbstractor resizes its table bilinearly
  return grids


class MM15(nnx.Module):
  """The multimodal model of `config.model`; submodules `vit`, `connector`, `llm`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    common = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                  attention_impl=config.attention_impl, scan_unroll=config.scan_unroll, rngs=rngs)
    self.vit = VisionTransformer(config.vit, **common)
    self.pixel_stats = (tuple(config.vit.image_mean), tuple(config.vit.image_std))
    self.connector = make_connector(config, rngs)
    self.llm = Decoder(config.llm, moe=config.moe, **common)

  def __call__(self, tokens, positions, segment_ids, images, image_token_positions, *, head=True) -> DecoderOutput:
    """The `DecoderOutput` of one batch (fields as in mm15_jax/batch.py): float32 logits
    [B, L, vocab] (None with head=False), the final norm's output and the MoE statistics.

    tokens, positions, segment_ids: int [B, L]; images: [B, T, S, S, 3] uint8 pixels (or floats already normalised);
    image_token_positions: int [B, T*K], -1 = unused slot. Shapes are static: unused tiles
    still run through the ViT (their tokens are dropped), so nothing here recompiles per batch.
    """
    x = self.embed(tokens, images, image_token_positions)
    return self.llm.decode(x, positions, segment_ids, head=head)

  def embed(self, tokens, images, image_token_positions):
    """The embedded sequence [B, L, D] with each tile's connector tokens written at its slots."""
    x = self.llm.embed(tokens)  # [B, L, D]
    b, length, d = x.shape
    t = images.shape[1]
    if t:
      tiles = normalize_pixels(images.reshape(b * t, *images.shape[2:]), *self.pixel_stats)
      feats = self.vit(tiles)  # [B*T, patches, vit_width]
      img = self.connector(feats)  # [B*T, K, D]
      img = img.reshape(b, -1, d).astype(x.dtype)  # [B, T*K, D], tile-major like the positions
      if img.shape[1] != image_token_positions.shape[1]:
        raise ValueError(f"image_token_positions has {image_token_positions.shape[1]} slots but "
                         f"{t} tiles give {img.shape[1]} tokens; check config.model.connector.tokens_per_tile")
      # -1 (unused) must not wrap to the last position: send it out of range and drop it.
      idx = jnp.where(image_token_positions < 0, length, image_token_positions)
      x = x.at[jnp.arange(b)[:, None], idx].set(img, mode="drop")
      x = constrain(x, ("batch", "length", "embed"))
    return x

  def prefill(self, tokens, positions, segment_ids, images, image_token_positions, last):
    """Inference's prompt pass (inputs as `__call__`, one prompt per row; last: int [B], each
    row's last prompt token) -> (logits [B, vocab] there, KV cache; see `Decoder.prefill`)."""
    x = self.embed(tokens, images, image_token_positions)
    return self.llm.prefill(x, positions, segment_ids, last)

  def step(self, tokens, positions, cache, lengths):
    """One decoding step: tokens, positions, lengths int [B] -> (logits [B, vocab], cache); see `Decoder.step`."""
    return self.llm.step(self.llm.embed(tokens[:, None]), positions[:, None], cache, lengths)
