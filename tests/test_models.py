"""Model family checks against independent NumPy float64 references (tiny dims, float32 compute)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mm15_jax import configs, modes
from mm15_jax.models import attention as attention_lib
from mm15_jax.models.connector import adaptive_avg_pool, make_connector
from mm15_jax.models.llm import Decoder, DecoderBlock
from mm15_jax.models.mm15 import MM15
from mm15_jax.models.vit import VisionTransformer, resize_pos_embedding


def tiny_llm(tie=False):
  return ml_collections.ConfigDict(dict(
      configs.base().model.llm.to_dict(),  # every field, the shape below
      n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48, vocab_size=64,
      rope_theta=10_000.0, tie_embeddings=tie, norm_eps=1e-5))


def tiny_model_config(kind="c_abstractor"):
  c = configs.base().model
  c.llm = tiny_llm().to_dict()
  c.vit.image_size = 16  # 2x2 patches of 8 px
  c.connector.tokens_per_tile = 4
  c.connector.depth = 1
  c.connector.kind = kind
  c.dtype = "float32"
  c.remat = "none"
  return c


# ---------------------------------------------------------------- NumPy references

def np_attention(q, k, v, q_seg, kv_seg, causal):
  """float64 loop over batch, heads, queries."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(lq):
        ok = [(kv_seg[bi, j] == q_seg[bi, i] != 0) and (not causal or j <= i) for j in range(k.shape[1])]
        ok = np.array(ok)
        if not ok.any():
          continue  # padding row: zeros
        s = k[bi, :, hi // group] @ q[bi, i, hi] / np.sqrt(d)
        s = np.where(ok, s, -np.inf)
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, :, hi // group]
  return out


def np_rmsnorm(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def np_rope(x, pos, theta):
  # x: [b, l, h, d]; rotate pairs (i, i + d/2) by pos * theta^(-2i/d)
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  ang = pos[:, :, None, None] * freq
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def np_decoder(model, cfg, tokens, positions, segments):
  f64 = lambda v: np.asarray(v[...], np.float64)
  emb = f64(model.embedding)
  x = emb[tokens]
  lay = model.layers
  silu = lambda z: z / (1 + np.exp(-z))
  for i in range(cfg.n_layers):
    y = np_rmsnorm(x, f64(lay.attn_norm.scale)[i], cfg.norm_eps)
    q = np.einsum("bld,dhk->blhk", y, f64(lay.q)[i])
    k = np.einsum("bld,dhk->blhk", y, f64(lay.k)[i])
    v = np.einsum("bld,dhk->blhk", y, f64(lay.v)[i])
    q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    a = np_attention(q, k, v, segments, segments, causal=True)
    x = x + np.einsum("blhk,hkd->bld", a, f64(lay.o)[i])
    y = np_rmsnorm(x, f64(lay.mlp_norm.scale)[i], cfg.norm_eps)
    x = x + (silu(y @ f64(lay.gate)[i]) * (y @ f64(lay.up)[i])) @ f64(lay.down)[i]
  x = np_rmsnorm(x, f64(model.final_norm.scale), cfg.norm_eps)
  head = emb.T if cfg.tie_embeddings else f64(model.lm_head)
  return x @ head


def np_adaptive_pool(x, oh, ow):
  n, h, w, c = x.shape
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      h0, h1 = int(np.floor(i * h / oh)), int(np.ceil((i + 1) * h / oh))
      w0, w1 = int(np.floor(j * w / ow)), int(np.ceil((j + 1) * w / ow))
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def jitted(model):
  """The trainer's pattern: split once, jit a function that merges."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda *a: nnx.merge(graphdef, state)(*a).logits)


def packed_inputs():
  # Row 0: segment 1 (5 tokens), segment 2 (4 tokens), 3 padding. Row 1: one segment of 12.
  tokens = np.random.RandomState(0).randint(0, 64, (2, 12)).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
  positions = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))], np.int32)
  return tokens, positions, segments


# ---------------------------------------------------------------- tests

def test_attention_xla_matches_numpy():
  rng = np.random.RandomState(0)
  q = rng.randn(2, 7, 4, 8).astype(np.float32)
  k = rng.randn(2, 7, 2, 8).astype(np.float32)
  v = rng.randn(2, 7, 2, 8).astype(np.float32)
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]], np.int32)
  for causal in (True, False):
    out = attention_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, np_attention(q, k, v, seg, seg, causal), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[0, 5:], 0)  # padding rows


def test_attention_rejects_bad_impl():
  q = jnp.zeros((1, 4, 2, 8))
  seg = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    attention_lib.attention(q, q, q, q_segment_ids=seg, kv_segment_ids=seg, impl="flash")
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    attention_lib.attention(q, q, q, q_segment_ids=seg, kv_segment_ids=seg, impl="splash")  # CPU here


def test_splash_kernel_in_interpret_mode():
  """The TPU path's wiring (GQA grouping, scaling, padding to blocks), run by the Pallas interpreter."""
  rng = np.random.RandomState(1)
  q = rng.randn(1, 20, 4, 8).astype(np.float32)
  k = rng.randn(1, 20, 2, 8).astype(np.float32)
  v = rng.randn(1, 20, 2, 8).astype(np.float32)
  seg = np.array([[1] * 9 + [2] * 8 + [0] * 3], np.int32)
  out = attention_lib.splash_interpret(q, k, v, seg, seg, True)
  out = np.where(seg[:, :, None, None] != 0, out, 0)
  np.testing.assert_allclose(out, np_attention(q, k, v, seg, seg, True), atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_decoder_matches_numpy(tie):
  cfg = tiny_llm(tie)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  tokens, positions, segments = packed_inputs()
  logits = jitted(model)(tokens, positions, segments)
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  ref = np_decoder(model, cfg, tokens, positions, segments)
  valid = segments != 0
  np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=1e-4, atol=1e-4)
  assert np.isfinite(np.asarray(logits)).all()


def test_decoder_output_has_the_same_fields_whatever_is_asked():
  """With and without the head: the same DecoderOutput; logits None without it, hidden the
  final norm's output either way (logits = hidden @ head weight), the dense aux all zeros."""
  model = Decoder(tiny_llm(), rngs=nnx.Rngs(1))
  tokens, positions, segments = packed_inputs()
  full = model(tokens, positions, segments)
  bare = model(tokens, positions, segments, head=False)
  assert type(full) is type(bare) and full._fields == ("logits", "hidden", "aux")
  assert bare.logits is None and full.hidden.shape == bare.hidden.shape == (2, 12, 32)
  np.testing.assert_allclose(full.hidden, bare.hidden, atol=1e-6)
  by_hand = np.asarray(bare.hidden, np.float64) @ np.asarray(model.head_weight(), np.float64)
  np.testing.assert_allclose(full.logits, by_hand, rtol=1e-5, atol=1e-5)
  assert float(full.aux["moe_lb_loss"]) == 0.0 and full.aux["expert_load"].shape == (0,)
  # Blocks answer (x, stats) alike; a dense block's stats are None, whatever the caller.
  block = DecoderBlock(tiny_llm(), dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla",
                       rngs=nnx.Rngs(0))
  x, stats = block(jnp.zeros((2, 12, 32)), positions, segments)
  assert x.shape == (2, 12, 32) and stats is None


def test_packing_invariance():
  model = Decoder(tiny_llm(), rngs=nnx.Rngs(2))
  run = jitted(model)
  tokens, positions, segments = packed_inputs()
  packed = np.asarray(run(tokens, positions, segments))[0]
  for start, n in ((0, 5), (5, 4)):
    alone = run(tokens[:1, start:start + n], np.arange(n)[None].astype(np.int32), np.ones((1, n), np.int32))
    np.testing.assert_allclose(packed[start:start + n], np.asarray(alone)[0], atol=1e-5)


def test_remat_policies_agree():
  tokens, positions, segments = packed_inputs()
  results = []
  for remat in modes.values(modes.Remat):  # "none" first, the reference
    model = Decoder(tiny_llm(), remat=remat, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, graphdef=graphdef):
      return (nnx.merge(graphdef, params)(tokens, positions, segments).logits ** 2).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    results.append((value, grads))
  for value, grads in results[1:]:
    np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, results[0][1])



Q, KV, D = "f32[2,2,12,4,8]", "f32[2,2,12,2,8]", "f32[2,2,12,32]"  # [layers, batch, length, ...]


@pytest.mark.parametrize("remat, kept", [
    ("full", []),
    ("qkv", [Q, KV, KV]),
    ("proj", [Q, KV, KV, D, D]),  # and the attention output and the MLP input, [.., d_model] each
    ("proj_offload", [f"f32<host>{t[3:]}" for t in (Q, KV, KV, D, D)]),  # the same, in host memory
])
def test_named_remat_policies_keep_what_they_name(remat, kept, capsys):
  """What the backward pass keeps from the forward one, per layer, beyond each layer's input
  (what full remat keeps): the policy's named activations and nothing else."""
  tokens, positions, segments = packed_inputs()
  model = Decoder(tiny_llm(), remat=remat, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda params: (nnx.merge(graphdef, params)(tokens, positions, segments).logits ** 2).mean()
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params)  # one line per residual: its type, where from
  saved = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)
  layer_inputs_and_output = [D, "f32[2,12,32]"]
  assert saved == sorted(kept + layer_inputs_and_output), saved


def test_vit_position_embedding_interpolation():
  cfg = tiny_model_config().vit
  vit = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  table = vit.pos_embedding[...]  # [2, 2, width] for 16 px / 8 px patches
  np.testing.assert_array_equal(resize_pos_embedding(table, 2, 2), table)
  big = resize_pos_embedding(table, 4, 3)
  assert big.shape == (4, 3, cfg.width)
  # Bilinear with half-pixel centres: output row 0 of 4 sits at input coordinate -0.25 -> clamps to row 0;
  # the mean over the grid is preserved for a 2 -> 4 upsampling along rows.
  np.testing.assert_allclose(np.asarray(resize_pos_embedding(table, 4, 2)).mean((0, 1)), np.asarray(table).mean((0, 1)),
                             atol=1e-6)
  # A 32 px image (4x4 patches) runs with the 16 px weights.
  feats = vit(jnp.ones((3, 32, 32, 3)))
  assert feats.shape == (3, 16, cfg.width)


@pytest.mark.parametrize("size", [(5, 2), (27, 12), (7, 3)])
def test_adaptive_avg_pool_matches_loop(size):
  n_in, n_out = size
  x = np.random.RandomState(0).randn(2, n_in, n_in, 3)
  np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x, jnp.float32), n_out, n_out),
                             np_adaptive_pool(x, n_out, n_out), atol=1e-5)


@pytest.mark.parametrize("kind", ["c_abstractor", "mlp"])
def test_connector_shapes(kind):
  c = tiny_model_config(kind)
  conn = make_connector(c, nnx.Rngs(0))
  out = conn(jnp.ones((3, 25, c.vit.width)))  # a 5x5 grid pooled to 2x2
  assert out.shape == (3, 4, c.llm.d_model)


def test_mm15_places_image_tokens():
  c = tiny_model_config()
  model = MM15(c, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a).logits)
  B, L, T, K = 2, 16, 2, 4
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 64, (B, L)).astype(np.int32)
  positions = np.tile(np.arange(L, dtype=np.int32), (B, 1))
  segments = np.ones((B, L), np.int32)
  images = rng.randn(B, T, 16, 16, 3).astype(np.float32)
  # Row 0: tile 0 at 3..6, tile 1 unused. Row 1: no images.
  itp = np.full((B, T * K), -1, np.int32)
  itp[0, :K] = [3, 4, 5, 6]
  logits = np.asarray(fwd(params, tokens, positions, segments, images, itp))
  assert logits.shape == (B, L, 64) and logits.dtype == np.float32

  # Expected embedding, built by a NumPy loop from the model's own ViT + connector outputs.
  img_tokens = np.asarray(model.connector(model.vit(images.reshape(B * T, 16, 16, 3)))).reshape(B, T * K, -1)
  x = np.asarray(model.llm.embed(tokens)).copy()
  for b in range(B):
    for slot, pos in enumerate(itp[b]):
      if pos >= 0:
        x[b, pos] = img_tokens[b, slot]
  expected = np.asarray(model.llm.decode(jnp.asarray(x), positions, segments).logits)
  np.testing.assert_allclose(logits, expected, atol=1e-4)
  # Row 1 (no images): exactly the text-only decoder.
  text = np.asarray(model.llm(tokens, positions, segments).logits)
  np.testing.assert_allclose(logits[1], text[1], atol=1e-5)
  # Changing the image changes logits only from its first position on (causal), and not the
  # unused tile: -1 must not wrap around to the last position.
  images2 = images.copy()
  images2[0, 0] += 1.0
  images2[:, 1] += 5.0
  logits2 = np.asarray(fwd(params, tokens, positions, segments, images2, itp))
  np.testing.assert_allclose(logits2[0, :3], logits[0, :3], atol=1e-6)
  assert np.abs(logits2[0, 3:] - logits[0, 3:]).max(-1).min() > 1e-4
  np.testing.assert_allclose(logits2[1], logits[1], atol=1e-6)


def test_base_config_runs_and_params_are_annotated():
  c = configs.base()
  model = MM15(c.model, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  for path, var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (jax.tree_util.keystr(path), names, var.shape)
    if "layers" in jax.tree_util.keystr(path):
      assert names[0] == "layers"
    leaf = str(path[-1])
    if "scale" in leaf or "bias" in leaf:  # weight-decay masks rely on these being vectors (per layer)
      assert var.ndim == 1 or (var.ndim == 2 and names[0] == "layers"), (jax.tree_util.keystr(path), var.shape)
  specs = nnx.get_partition_spec(params)
  for var, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, nnx.Variable))):
    assert len(spec.get_value() if isinstance(spec, nnx.Variable) else spec) == var.ndim
  assert {"vit", "connector", "llm"} <= set(params.keys())

  # Abstract creation, then the trainer's split/merge under jit, on the batch schema of base().
  abstract = nnx.eval_shape(lambda: MM15(c.model, rngs=nnx.Rngs(0)))
  assert abstract.llm.embedding.shape == (c.model.llm.vocab_size, c.model.llm.d_model)
  B, L, S, K = 2, c.data.seq_len, c.model.vit.image_size, c.model.connector.tokens_per_tile
  itp = np.full((B, c.data.max_tiles * K), -1, np.int32)
  itp[0, :10] = np.arange(10)  # the base config has more image slots than positions: use a few
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logits = jax.jit(lambda p, *a: nnx.merge(graphdef, p, rest)(*a).logits)(
      params, np.zeros((B, L), np.int32), np.tile(np.arange(L, dtype=np.int32), (B, 1)), np.ones((B, L), np.int32),
      np.zeros((B, c.data.max_tiles, S, S, 3), np.float32), itp)
  assert logits.shape == (B, L, c.model.llm.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_uint8_pixels_are_clip_normalised_on_device():
  c = tiny_model_config()
  model = MM15(c, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(1)
  B, L, T, K = 1, 8, 1, 4
  tokens = rng.randint(0, 64, (B, L)).astype(np.int32)
  positions = np.tile(np.arange(L, dtype=np.int32), (B, 1))
  segments = np.ones((B, L), np.int32)
  itp = np.arange(T * K, dtype=np.int32)[None] + 1
  pixels = rng.randint(0, 256, (B, T, 16, 16, 3)).astype(np.uint8)
  # open_clip OPENAI_DATASET_MEAN / STD, typed in from open_clip/constants.py.
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  normalised = ((pixels / 255.0 - mean) / std).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(model(tokens, positions, segments, pixels, itp).logits),
      np.asarray(model(tokens, positions, segments, normalised, itp).logits), atol=1e-5)

