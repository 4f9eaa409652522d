"""Learned position tables start as 2-D sin-cos codes (ViT and connector), by hand."""

import numpy as np
from flax import nnx

from mm15_jax import configs
from mm15_jax.models import vit as vit_lib
from mm15_jax.models.mm15 import MM15


def test_sincos_codes_by_hand():
  codes = vit_lib.sincos_2d(3, 8)
  omega = [1.0, 0.01]  # 1 / 10000^(k / 2), k = 0, 1
  for row in range(3):
    for col in range(3):
      want = [np.sin(col * w) for w in omega] + [np.cos(col * w) for w in omega] + \
             [np.sin(row * w) for w in omega] + [np.cos(row * w) for w in omega]
      np.testing.assert_allclose(codes[row, col], want, rtol=1e-12, atol=1e-12)
  assert len({tuple(np.round(v, 6)) for v in codes.reshape(9, 8)}) == 9  # every patch its own code


def test_a_fresh_model_starts_from_the_codes():
  config = configs.base()
  model = MM15(config.model, rngs=nnx.Rngs(0))
  grid, width = config.model.vit.image_size // config.model.vit.patch_size, config.model.vit.width
  np.testing.assert_allclose(np.asarray(model.vit.pos_embedding[...]), vit_lib.sincos_2d(grid, width, width ** -0.5),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(model.connector.pos_embedding[...]), vit_lib.sincos_2d(grid, width, 0.1),
                             atol=1e-6)
  assert isinstance(model.vit.pos_embedding, nnx.Param) and isinstance(model.connector.pos_embedding, nnx.Param)
