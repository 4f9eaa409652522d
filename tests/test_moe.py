"""Mixture of experts: both paths against a NumPy float64 loop over experts, the auxiliary losses,
gradients, expert parallelism against one device, the MoE decoder and upcycling."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mm15_jax import configs
from mm15_jax import sharding as shd
from mm15_jax.models import build
from mm15_jax.models import moe as moe_lib
from mm15_jax.models.llm import Decoder, upcycle_decoder_params
from mm15_jax.models.mm15 import MM15
from mm15_jax.plan import chips as chips_lib

D, F, E = 16, 24, 8


def moe_config(**fields):
  """config.model.moe: base()'s, with `fields` changed."""
  return dict(configs.base().model.moe.to_dict(), **fields)


def settings(impl="ragged", top_k=2, capacity_factor=1.25, num_experts=E):
  return moe_lib.moe_settings(moe_config(num_experts=num_experts, top_k=top_k, impl=impl,
                                         capacity_factor=capacity_factor), F)


def make_layer(seed=0, **kw):
  return moe_lib.MoE(D, settings(**kw), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def inputs(b=4, length=6, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(b, length, D).astype(np.float32)
  valid = np.ones((b, length), bool)
  valid[0, -2:] = False  # padding
  return x, valid


# ---------------------------------------------------------------- NumPy reference

def np_moe(layer, x, valid, top_k, cap=None):
  """float64: route, queue assignments choice-major (if `cap`), loop over experts."""
  f64 = lambda v: np.asarray(v[...], np.float64)
  router, gate, up, down = f64(layer.router), f64(layer.gate), f64(layer.up), f64(layer.down)
  xt = np.asarray(x, np.float64).reshape(-1, D)
  ok = np.asarray(valid).reshape(-1)
  t = xt.shape[0]
  logits = xt @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  w = np.take_along_axis(probs, experts, -1)
  if top_k > 1:
    w /= w.sum(-1, keepdims=True)
  kept = np.zeros((t, top_k), bool)
  fill = np.zeros(E, int)
  for j in range(top_k):  # choice-major queue
    for i in range(t):
      if ok[i]:
        e = experts[i, j]
        kept[i, j] = cap is None or fill[e] < cap
        fill[e] += 1
  silu = lambda z: z / (1 + np.exp(-z))
  y = np.zeros_like(xt)
  for e in range(E):
    for i, j in zip(*np.nonzero((experts == e) & kept)):
      h = silu(xt[i] @ gate[e]) * (xt[i] @ up[e])
      y[i] += w[i, j] * (h @ down[e])
  n = ok.sum()
  load = np.array([((experts == e) & ok[:, None]).sum() for e in range(E)]) / (n * top_k)
  mean_prob = probs[ok].mean(0)
  lse = np.log(np.exp(logits).sum(-1))
  stats = dict(lb_loss=E * (load * mean_prob).sum(), z_loss=(lse[ok] ** 2).mean(), load=load,
               dropped=(ok[:, None] & ~kept).sum())
  return y.reshape(x.shape), stats


def check_stats(stats, ref):
  for k in ("lb_loss", "z_loss", "load", "dropped"):
    np.testing.assert_allclose(np.asarray(stats[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------- paths against the reference

@pytest.mark.parametrize("impl", ["ragged", "megablox", "blocked", "tokamax", "capacity"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_paths_match_numpy_without_drops(impl, top_k):
  layer = make_layer(impl=impl, top_k=top_k, capacity_factor=float(E))  # capacity >= all tokens
  x, valid = inputs()
  y, stats = jax.jit(lambda x, v: layer(x, v))(x, valid)
  ref, ref_stats = np_moe(layer, x, valid, top_k)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[~valid], 0)  # padding gets no expert output
  check_stats(stats, ref_stats)
  assert float(stats["dropped"]) == 0


def test_capacity_drops_exactly_the_assignments_beyond_capacity():
  layer = make_layer(impl="capacity", top_k=2, capacity_factor=0.5)
  x, valid = inputs()
  t = x.shape[0] * x.shape[1]
  cap = moe_lib.capacity(t, 2, E, 0.5)
  assert cap == math.ceil(0.5 * t * 2 / E) == 3
  y, stats = jax.jit(lambda x, v: layer(x, v))(x, valid)
  ref, ref_stats = np_moe(layer, x, valid, 2, cap=cap)
  assert ref_stats["dropped"] > 0  # the test really drops
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  check_stats(stats, ref_stats)


def test_capacity_slots_are_choice_major():
  # Three tokens all choose expert 0 first and expert 1 second; capacity 2 per expert.
  experts = jnp.array([[0, 1], [0, 1], [0, 1]])
  valid = jnp.array([True, False, True])  # padding takes no slot
  slots, dropped = moe_lib.capacity_slots(experts, valid, 2, 2)
  np.testing.assert_array_equal(slots, [[0, 2], [-1, -1], [1, 3]])
  assert int(dropped) == 0
  slots, dropped = moe_lib.capacity_slots(jnp.array([[0, 1], [1, 0], [0, 1]]), jnp.ones(3, bool), 2, 2)
  # First choices fill first: t0->e0 s0, t1->e1 s0, t2->e0 s1; then t0->e1 s1; t1->e0 and t2->e1 dropped.
  np.testing.assert_array_equal(slots, [[0, 3], [2, -1], [1, -1]])
  assert int(dropped) == 2


def test_balancing_and_z_loss_on_hand_made_logits():
  # 4 tokens, 4 experts, top-1; the router is the identity so x are the logits.
  logits = np.log(np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1],
                            [0.6, 0.2, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1]]))
  x, router = jnp.asarray(logits, jnp.float32), jnp.eye(4)
  for k in (1, 2):
    lg, probs, _, experts = moe_lib.route(x, router, k)
    stats = moe_lib.finalize_stats(moe_lib.stat_sums(lg, probs, experts, jnp.ones(4, bool), jnp.zeros(())), k)
    if k == 1:
      f = np.array([2, 1, 1, 0]) / 4  # argmax experts 0, 1, 0, 2
    else:  # second choices 1, 0, 1, and a tie 0/1 at 0.25 broken to the lower index (0)
      f = (np.array([2, 1, 1, 0]) + np.array([1, 2, 0, 0]) + np.array([1, 0, 0, 0])) / 8
      assert np.asarray(experts)[3].tolist() == [2, 0]
    p = np.exp(logits).mean(0)
    np.testing.assert_allclose(stats["lb_loss"], 4 * (f * p).sum(), rtol=1e-5)
    np.testing.assert_allclose(stats["load"], f, rtol=1e-6)
    np.testing.assert_allclose(stats["z_loss"], 0.0, atol=1e-6)  # rows sum to 1: logsumexp = 0
  # A uniform router scores exactly 1; z-loss of shifted logits is the shift squared.
  lg, probs, _, _ = moe_lib.route(jnp.full((8, 4), 3.0), jnp.eye(4), 1)
  experts = jnp.arange(8)[:, None] % 4  # hand-made balanced routing
  stats = moe_lib.finalize_stats(moe_lib.stat_sums(lg, probs, experts, jnp.ones(8, bool), jnp.zeros(())), 1)
  np.testing.assert_allclose(stats["lb_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], (3.0 + np.log(4)) ** 2, rtol=1e-6)


@pytest.mark.parametrize("impl", ["ragged", "megablox", "blocked", "tokamax", "capacity"])
def test_gradients_reach_router_and_experts(impl):
  layer = make_layer(impl=impl)
  graphdef, params = nnx.split(layer, nnx.Param)
  x, valid = inputs()
  r = np.random.RandomState(1).randn(*x.shape).astype(np.float32)

  def loss(p):
    y, stats = nnx.merge(graphdef, p)(x, valid)
    return jnp.sum(y * r) + stats["lb_loss"] + stats["z_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  for name in ("router", "gate", "up", "down"):
    g = np.asarray(grads[name][...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
  # Every expert that received tokens gets a gradient.
  used = np.asarray(layer(x, valid)[1]["load"]) > 0
  assert (np.abs(np.asarray(grads["gate"][...])).sum((1, 2)) > 0)[used].all()


# ---------------------------------------------------------------- expert parallelism

def run_layer(layer, x, valid, mesh=None):
  """(y, stats, grads) of a fixed loss, jitted; on `mesh` with the default rules and sharded params."""
  graphdef, params = nnx.split(layer, nnx.Param)
  r = np.random.RandomState(1).randn(*x.shape).astype(np.float32)

  def loss(p, x, v):
    y, stats = nnx.merge(graphdef, p)(x, v)
    return jnp.sum(y * r) + stats["lb_loss"] + stats["z_loss"], (y, stats)

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    (_, (y, stats)), grads = fn(params, x, valid)
    return y, stats, grads, ""
  params, (x, valid) = on_mesh(params, mesh, x, valid)
  with shd.use_rules(mesh, configs.DEFAULT_RULES):
    hlo = fn.lower(params, x, valid).compile().as_text()
    (_, (y, stats)), grads = fn(params, x, valid)
  return y, stats, grads, hlo


def on_mesh(params, mesh, *batch):
  """Params placed by their logical axes and the default rules (as the trainer does); batch arrays by rows."""
  rules = configs.DEFAULT_RULES
  pure = nnx.to_pure_dict(params)
  shardings = build.param_shardings(build.logical_axes(params), pure, mesh, rules)
  nnx.replace_by_pure_dict(params, jax.device_put(pure, shardings))
  rows = lambda a: NamedSharding(mesh, shd.logical_to_mesh(("batch",) + (None,) * (np.ndim(a) - 1), rules, mesh))
  return params, tuple(jax.device_put(a, rows(a)) for a in batch)


@pytest.mark.parametrize("impl", ["ragged", "megablox", "blocked", "tokamax", "capacity"])
@pytest.mark.parametrize("axes,n", [(dict(data=1, fsdp=1, tensor=1, expert=4), 4),
                                    (dict(data=1, fsdp=2, tensor=2, expert=2), 8)])
def test_expert_parallel_equals_single_device(impl, axes, n):
  layer = make_layer(impl=impl, capacity_factor=float(E))  # no drops: per-shard capacity is then moot
  x, valid = inputs(b=8)
  y1, s1, g1, _ = run_layer(layer, x, valid)
  mesh = shd.make_mesh(axes, devices=jax.devices()[:n])
  yn, sn, gn, hlo = run_layer(layer, x, valid, mesh)
  assert "all-to-all" in hlo  # tokens really travel to their experts' shards
  assert len(gn["gate"][...].sharding.device_set) == n
  np.testing.assert_allclose(yn, y1, rtol=1e-5, atol=1e-6)
  for k in s1:
    np.testing.assert_allclose(sn[k], s1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for k in ("router", "gate", "up", "down"):
    np.testing.assert_allclose(gn[k][...], g1[k][...], rtol=1e-4, atol=1e-6, err_msg=k)


def test_dropless_expert_parallel_for_tpu_sends_routed_rows_to_the_kernel():
  """Lowered for a v5p slice (libtpu's topology, no TPU needed): impl "auto" exchanges rows with
  ragged_all_to_all, gradients included, and runs the experts in the megablox kernel; the CPU
  run above checks the same exchange, padded, against one device."""
  layer = make_layer(impl="auto")
  graphdef, params = nnx.split(layer, nnx.Param)
  x, valid = inputs(b=8)
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=4), devices=chips_lib.tpu_devices("v5p:2x2x1"))
  shardings = build.param_shardings(build.logical_axes(params), nnx.to_pure_dict(params), mesh, configs.DEFAULT_RULES)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(params),
                          shardings)
  rows = NamedSharding(mesh, shd.logical_to_mesh(("batch", None, None), configs.DEFAULT_RULES, mesh))

  def loss(p, x, v):
    layer = nnx.merge(graphdef, nnx.State(p))
    y, stats = layer(x, v)
    return jnp.sum(y) + stats["lb_loss"]

  with shd.use_rules(mesh, configs.DEFAULT_RULES):
    text = jax.jit(jax.grad(loss)).lower(
        abstract, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows),
        jax.ShapeDtypeStruct(valid.shape, valid.dtype, sharding=NamedSharding(mesh, P(*rows.spec[:2])))).as_text()
  # Out and back in the forward pass, and the backward's transpose (a function both call).
  assert text.count("custom_call @ragged_all_to_all") >= 3
  assert "tpu_custom_call" in text  # the Pallas kernel, compiled for the TPU (not interpreted)


def test_expert_parallel_capacity_is_per_token_shard():
  # With drops, capacity counts each token shard's own assignments (GShard groups).
  layer = make_layer(impl="capacity", capacity_factor=0.5)
  x, valid = inputs(b=8)
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=4), devices=jax.devices()[:4])
  y, stats, _, _ = run_layer(layer, x, valid, mesh)
  t_loc = x.shape[0] * x.shape[1] // 4
  cap = moe_lib.capacity(t_loc, 2, E, 0.5)
  ys, dropped = [], 0
  for s in range(4):
    rows = slice(2 * s, 2 * s + 2)
    ref, ref_stats = np_moe(layer, x[rows], valid[rows], 2, cap=cap)
    ys.append(ref)
    dropped += ref_stats["dropped"]
  np.testing.assert_allclose(y, np.concatenate(ys), rtol=1e-4, atol=1e-5)
  assert float(stats["dropped"]) == dropped > 0


# ---------------------------------------------------------------- the MoE decoder

def tiny_llm(n_layers=4):
  return ml_collections.ConfigDict(dict(
      configs.base().model.llm.to_dict(),  # every field, the shape below
      n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48, vocab_size=64,
      rope_theta=10_000.0, tie_embeddings=False, norm_eps=1e-5))


def packed():
  tokens = np.random.RandomState(0).randint(0, 64, (2, 12)).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
  positions = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))], np.int32)
  return tokens, positions, segments


def test_moe_decoder_on_expert_fsdp_tensor_mesh_equals_one_device():
  """Scan, remat and activation constraints around the shard_map: logits, aux and grads as on one device."""
  model = Decoder(tiny_llm(), remat="full", moe=moe_config(num_experts=4, top_k=2, interval=2, impl="ragged"),
                  rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens, positions, segments = (np.concatenate([a, a[::-1]] * 2) for a in packed())  # 8 rows

  def loss(p, *batch):
    logits, _, aux = nnx.merge(graphdef, p)(*batch)
    return jnp.mean(logits ** 2) + aux["moe_lb_loss"] + aux["moe_z_loss"], (logits, aux)

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, want), g1 = fn(params, tokens, positions, segments)
  mesh = shd.make_mesh(dict(data=1, fsdp=2, tensor=2, expert=2))
  params, batch = on_mesh(params, mesh, tokens, positions, segments)
  with shd.use_rules(mesh, configs.DEFAULT_RULES):
    (_, got), g8 = fn(params, *batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g8, g1)


@pytest.mark.parametrize("interval", [1, 2, 4])
def test_upcycled_decoder_equals_dense(interval):
  """Identical experts with renormalised top-2 weights compute the dense FFN: same logits."""
  cfg = tiny_llm()
  dense = Decoder(cfg, rngs=nnx.Rngs(0))
  moe_cfg = moe_config(num_experts=4, top_k=2, interval=interval, impl="ragged")
  model = Decoder(cfg, moe=moe_cfg, rngs=nnx.Rngs(1))
  params = nnx.state(model, nnx.Param)
  dense_pure = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
  nnx.replace_by_pure_dict(params, upcycle_decoder_params(dense_pure, nnx.to_pure_dict(params)))
  nnx.update(model, params)
  tokens, positions, segments = packed()
  run = lambda m: jax.jit(lambda *a: m(*a))(tokens, positions, segments)
  want = run(dense).logits
  got, _, aux = run(model)
  valid = segments != 0
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)
  assert aux["expert_load"].shape == (4,)
  np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)
  # Upcycling with noise keeps shapes and makes experts differ.
  noisy = moe_lib.upcycle_dense_mlp(*(dense_pure["layers"][k] for k in ("gate", "up", "down")), 4, noise=0.1,
                                    key=jax.random.key(0))
  assert noisy["gate"].shape == (4, 4, 32, 48)
  assert not np.allclose(noisy["gate"][:, 0], noisy["gate"][:, 1])


def test_moe_param_tree_and_logical_axes():
  model = Decoder(tiny_llm(), moe=moe_config(num_experts=4, top_k=2, interval=2), rngs=nnx.Rngs(0))
  logical = build.logical_axes(nnx.state(model, nnx.Param))
  sparse = logical["layers"]["sparse"]
  assert sparse["moe"]["router"] == ("layers", "embed", None)
  assert sparse["moe"]["gate"] == ("layers", "expert", "embed", "mlp")
  assert sparse["moe"]["down"] == ("layers", "expert", "mlp", "embed")
  assert "gate" not in sparse and logical["layers"]["dense"]["gate"] == ("layers", "layers", "embed", "mlp")
  assert model.layers.sparse.moe.gate.shape == (2, 4, 32, 48)
  with pytest.raises(ValueError, match="moe.interval=3 must divide"):
    Decoder(tiny_llm(), moe=moe_config(num_experts=4, interval=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="moe.impl"):
    Decoder(tiny_llm(), moe=moe_config(num_experts=4, impl="megablocks"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["ragged", "capacity"])
def test_tiny_moe_mm15_forward_backward(impl):
  c = configs.base().model
  c.moe = dict(num_experts=4, top_k=2, interval=2, expert_mlp_dim=0, impl=impl, capacity_factor=1.25,
               lb_loss_weight=0.01, z_loss_weight=0.001)
  c.remat = "full"  # compute stays bfloat16, as in training
  model = MM15(c, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b, length, s = 2, 16, c.vit.image_size
  args = (np.random.RandomState(0).randint(0, 512, (b, length)).astype(np.int32),
          np.tile(np.arange(length, dtype=np.int32), (b, 1)), np.ones((b, length), np.int32),
          np.zeros((b, 0, s, s, 3), np.uint8), np.zeros((b, 0), np.int32))  # text only: the ViT is not the point

  def loss(p):
    logits, _, aux = nnx.merge(graphdef, p, rest)(*args)
    return jnp.mean(logits ** 2) + 0.01 * aux["moe_lb_loss"] + 0.001 * aux["moe_z_loss"], aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(value)
  assert aux["expert_load"].shape == (4,) and float(aux["moe_lb_loss"]) > 0
  g = grads["llm"]["layers"]["sparse"]["moe"]
  for name in ("router", "gate", "up", "down"):
    assert np.isfinite(np.asarray(g[name][...])).all() and np.abs(np.asarray(g[name][...])).max() > 0, name
  # A dense model's output has the same fields, with zeros and an empty load.
  c.moe.num_experts = 0
  _, _, aux = MM15(c, rngs=nnx.Rngs(0))(*args)
  assert aux["expert_load"].shape == (0,) and float(aux["moe_lb_loss"]) == 0.0
