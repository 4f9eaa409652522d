"""Dense projections as one 2-D matmul: x [..., K...] @ w [K..., N...] -> [..., N...].

  dense(x, w)              x [b, l, d] @ w [d, f]      -> [b, l, f]
  dense(x, w, contract=2)  x [b, l, h, k] @ w [h, k, d] -> [b, l, d]

The same product as `jnp.einsum("bld,df->blf", x, w)`, with every leading axis of x folded
into one row axis first. XLA:CPU runs the weight gradient of the einsum form (a contraction
over batch and length together) outside its fast matmul path, 3x slower than the folded form
(benchmarks/RESULTS.md, "Train step, CPU"); on TPU and GPU XLA folds the axes itself, so the
two compile alike. Folding keeps the batch axis's sharding: it is the major axis of the rows.
"""

import math

import jax.numpy as jnp


def dense(x, w, contract: int = 1, preferred_element_type=None):
  """x's last `contract` axes against w's first `contract` axes (equal shapes)."""
  k_shape, n_shape = w.shape[:contract], w.shape[contract:]
  if x.shape[x.ndim - contract:] != k_shape:
    raise ValueError(f"dense: x {x.shape} does not end with w's input axes {k_shape} (w {w.shape})")
  lead = x.shape[:x.ndim - contract]
  k = math.prod(k_shape)
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *n_shape)
