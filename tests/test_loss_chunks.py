"""train.loss_chunk: the LM head and cross-entropy a chunk of positions at a time, fused backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_setup import host_batch, place, setup_on, tiny_config

from mm15_jax.train import config_checks
from mm15_jax.train import state as state_lib
from mm15_jax.train import step as step_lib
from mm15_jax.train.loss import chunked_token_terms, fused_cross_entropy

MESH = dict(data=2, fsdp=2, tensor=2, expert=1)


def numpy_reference(h, w, t, m, z):
  """float64: the sums and d(3 * (loss_sum + z_sum)) / d(h, w), by hand."""
  logits = h @ w
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = log_z - np.take_along_axis(logits, t[..., None], -1)[..., 0]
  probs = np.exp(logits - log_z[..., None])
  d_logits = 3 * m[..., None] * ((1 + 2 * z * log_z)[..., None] * probs - np.eye(w.shape[1])[t])
  sums = (nll * m).sum(), (z * log_z**2 * m).sum(), ((logits.argmax(-1) == t) * m).sum()
  return sums, np.einsum("blv,dv->bld", d_logits, w), np.einsum("bld,blv->dv", h, d_logits)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_fused_cross_entropy_against_numpy(chunk):
  rng = np.random.default_rng(chunk)
  h, w = rng.normal(size=(3, 16, 8)), rng.normal(size=(8, 50))
  t, m = rng.integers(0, 50, size=(3, 16)), (rng.random((3, 16)) > 0.3).astype(np.float64)

  def objective(h, w):
    out = fused_cross_entropy(h, w, jnp.asarray(t), jnp.asarray(m), 1e-2, chunk)
    return 3 * out[0], out[1:]

  (value, sums), (d_h, d_w) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
      jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
  want_sums, want_h, want_w = numpy_reference(h, w, t, m, 1e-2)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5)
  np.testing.assert_allclose(value, 3 * (want_sums[0] + want_sums[1]), rtol=1e-5)
  np.testing.assert_allclose(d_h, want_h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d_w, want_w, rtol=1e-4, atol=1e-5)
  # Evaluation's per-position terms: the same chunks, no gradient.
  nll, _, _ = chunked_token_terms(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(t), chunk)
  np.testing.assert_allclose((np.asarray(nll) * m).sum(), want_sums[0], rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_gives_the_whole_logits_loss_and_grads(tie):
  """On a sharded mesh, with z-loss, tied or untied embeddings: same loss, metrics, grads, eval sums."""
  config = tiny_config(**{"train.z_loss": 1e-3, "model.llm.tie_embeddings": tie})
  batch = host_batch(config)
  results = []
  for chunk in (0, 32):
    config.train.loss_chunk = chunk
    setup = setup_on(config, MESH)
    params = state_lib.init_state(setup)["params"]
    placed = place(setup, batch)
    loss, aux, grads = step_lib.jit_loss_and_grads(setup)(params, placed)
    evals = step_lib.jit_eval_step(setup)(params, placed)
    results.append(jax.device_get((loss, aux, grads, evals)))
  (loss0, aux0, grads0, eval0), (loss1, aux1, grads1, eval1) = results
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for key in ("loss_sum", "z_sum", "correct", "count"):
    np.testing.assert_allclose(aux1[key], aux0[key], rtol=1e-5)
  assert aux0["z_sum"] > 0
  for (path, g0), g1 in zip(jax.tree_util.tree_leaves_with_path(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g1, g0, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  for key in eval0:
    np.testing.assert_allclose(eval1[key], eval0[key], rtol=1e-5, err_msg=key)


def test_bfloat16_fused_gradients_are_as_close_to_float32_as_xlas():
  """In bf16 compute the fused backward rounds where XLA's gradient of the whole logits does:
  against the float32 step, its error per param is that of the bf16 whole-logits step."""
  config = tiny_config(**{"train.z_loss": 1e-3})
  batch = host_batch(config)
  grads = {}
  for dtype, chunk in (("float32", 0), ("bfloat16", 0), ("bfloat16", 32)):
    config.model.dtype, config.train.loss_chunk = dtype, chunk
    setup = setup_on(config, MESH)
    params = state_lib.init_state(setup)["params"]
    grads[dtype, chunk] = jax.device_get(step_lib.jit_loss_and_grads(setup)(params, place(setup, batch))[2])
  reference = jax.tree_util.tree_leaves_with_path(grads["float32", 0])
  for (path, want), xla, fused in zip(reference, jax.tree.leaves(grads["bfloat16", 0]),
                                      jax.tree.leaves(grads["bfloat16", 32])):
    scale = np.linalg.norm(want)
    if scale < 1e-6:  # a gradient zero in exact arithmetic (a key bias: softmax ignores it)
      continue
    xla_error, fused_error = np.linalg.norm(xla - want) / scale, np.linalg.norm(fused - want) / scale
    assert fused_error < 1.3 * xla_error + 2e-3, (jax.tree_util.keystr(path), fused_error, xla_error)


def test_chunks_keep_the_logits_out_of_memory():
  """Growing the vocabulary 512 -> 16384 adds [batch, length, vocab] float32 arrays to the
  whole-logits step's temporaries, and at most a few chunks' worth to the chunked step's
  (XLA's compiled temporaries, one device)."""
  config = tiny_config()
  batch = host_batch(config)
  b, length = batch["tokens"].shape
  temps = {}
  for vocab in (512, 16384):
    for chunk in (0, 32):
      config.model.llm.vocab_size, config.train.loss_chunk = vocab, chunk
      setup = setup_on(config, dict(data=1, fsdp=1, tensor=1, expert=1), jax.devices()[:1])
      params = setup.abstract_state["params"]
      compiled = step_lib.jit_loss_and_grads(setup).lower(params, place(setup, batch)).compile()
      temps[vocab, chunk] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = b * length * (16384 - 512) * 4
  assert temps[16384, 0] - temps[512, 0] > logits_bytes, temps
  assert temps[16384, 32] - temps[512, 32] < 3 * logits_bytes * 32 / length, temps


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
  config = tiny_config(**{"train.loss_chunk": 100})
  with pytest.raises(ValueError, match=r"train.loss_chunk=100 must be 0 .*data.seq_len=256 or divide it, e.g. 4"):
    config_checks.check_config(config, paths=False)
  for fine in (0, 64, 256, 1024):  # a chunk past the sequence is the whole sequence
    config_checks.check_config(tiny_config(**{"train.loss_chunk": fine}), paths=False)
