"""Mixture-of-experts feed-forward layer: top-k router, SwiGLU experts, expert parallelism.

`config.model.moe.impl` picks how tokens reach their experts:
  "auto"      "megablox" on TPU, "tokamax" on GPU, "blocked" on CPU (the backend the program is
              compiled for)
  "ragged"    dropless: assignments sorted by expert, one grouped matmul (`jax.lax.ragged_dot`)
  "megablox"  the same with the Pallas grouped-matmul kernel (models/grouped_matmul.py)
  "blocked"   the same as a loop of one plain matmul per block of rows of one expert (XLA)
  "tokamax"   the same with tokamax's GPU kernels (models/grouped_matmul.py; the gpu extra)
  "capacity"  each expert takes at most C = ceil(capacity_factor * tokens * top_k / experts)
              assignments per token shard (tokens: the shard's token slots, padding included);
              the rest are dropped (counted) and contribute zero

Routing: float32 logits, softmax over experts, top-k; with k > 1 the k weights are renormalised
to sum to 1 (Mixtral); with k = 1 the raw probability is kept (Switch), so the router still
learns from the task loss. Capacity priority is choice-major: every token's first choice is
placed (in token order) before any second choice (GShard).

Expert parallelism: when the logical "expert" axis maps to a mesh axis of size > 1, the layer
runs in `jax.shard_map`, manual over every mesh axis. Tokens stay where the batch sharding put
them; each token shard routes its own tokens and exchanges them over the expert axis, so each
shard runs only its local experts: the dropless paths send only the routed rows
(`jax.lax.ragged_all_to_all` on TPU and GPU; on CPU, which lacks it, the same exchange padded),
the capacity path its fixed [experts, capacity] buffers (`jax.lax.all_to_all`).
Expert weights enter gathered over their "embed" axes (FSDP's all-gather, done by shard_map's
resharding) and split over their "mlp" axes (tensor parallelism: partial outputs summed).
With one expert shard the same code runs without the exchange. Tokens that do not split over
the batch shards are an error in training; only inference (lenient rules, `sharding.use_rules`)
runs such a batch (e.g. one prompt) unsharded, and only with one expert shard.

Padding tokens (`valid` False, i.e. segment id 0) take no capacity, get zero output and are left
out of every statistic and auxiliary loss.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mm15_jax import modes
from mm15_jax import sharding as shd
from mm15_jax.models.grouped_matmul import (
  TOKAMAX_MISSING,
  blocked_swiglu,
  grouped_matmul,
  kernel_for,
  tokamax_installed,
)


def check_moe(moe_cfg, n_layers: int) -> None:
  """Clear errors for a bad `config.model.moe` before anything is built."""
  if modes.parse(modes.MoeImpl, moe_cfg["impl"]) == modes.MoeImpl.TOKAMAX and not tokamax_installed():
    raise ValueError(TOKAMAX_MISSING)
  e, k, interval = moe_cfg["num_experts"], moe_cfg["top_k"], moe_cfg["interval"]
  if not 1 <= k <= e:
    raise ValueError(f"config.model.moe.top_k={k} must be in [1, num_experts={e}]")
  if interval < 1 or n_layers % interval:
    raise ValueError(f"config.model.moe.interval={interval} must divide config.model.llm.n_layers={n_layers} "
                     f"(every interval-th layer is MoE); e.g. --config.model.moe.interval=2")


def moe_settings(moe_cfg, mlp_dim: int):
  """`config.model.moe` (ConfigDict or dict, every field of configs.base()'s; None: dense) as the
  plain dict the layers read, impl a modes.MoeImpl and expert_mlp_dim 0 resolved to `mlp_dim`;
  None for a dense model (num_experts 0)."""
  if moe_cfg is None or not moe_cfg["num_experts"]:
    return None
  impl = modes.parse(modes.MoeImpl, moe_cfg["impl"])  # first: the clearest error for a bad value
  return dict(num_experts=int(moe_cfg["num_experts"]), top_k=int(moe_cfg["top_k"]), interval=int(moe_cfg["interval"]),
              expert_mlp_dim=int(moe_cfg["expert_mlp_dim"]) or mlp_dim, impl=impl,
              capacity_factor=float(moe_cfg["capacity_factor"]))


def _param(rngs, shape, names, dtype, in_axis, batch_axis=()):
  # LeCun truncated normal over the input axis, independently per expert (batch_axis).
  init = jax.nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=-1, batch_axis=batch_axis)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names))


class MoE(nnx.Module):
  """Top-k routed SwiGLU experts; a drop-in for the dense MLP of a decoder block."""

  def __init__(self, d_model: int, settings: dict, *, dtype, param_dtype, rngs: nnx.Rngs):
    e, f = settings["num_experts"], settings["expert_mlp_dim"]
    self.num_experts, self.top_k = e, settings["top_k"]
    self.impl, self.capacity_factor = modes.parse(modes.MoeImpl, settings["impl"]), settings["capacity_factor"]
    self.dtype = dtype
    self.router = _param(rngs, (d_model, e), ("embed", None), param_dtype, 0)
    self.gate = _param(rngs, (e, d_model, f), ("expert", "embed", "mlp"), param_dtype, 1, 0)
    self.up = _param(rngs, (e, d_model, f), ("expert", "embed", "mlp"), param_dtype, 1, 0)
    self.down = _param(rngs, (e, f, d_model), ("expert", "mlp", "embed"), param_dtype, 1, 0)

  def __call__(self, x, valid=None):
    """x: [batch, length, embed]; valid: bool [batch, length] -> (y like x, stats of `finalize_stats`)."""
    b, length, d = x.shape
    tokens = jnp.asarray(x).reshape(b * length, d)
    valid = jnp.ones((b * length,), bool) if valid is None else jnp.asarray(valid).reshape(-1)
    weights = dict(router=self.router[...].astype(jnp.float32),
                   **{k: getattr(self, k)[...].astype(self.dtype) for k in ("gate", "up", "down")})
    y, sums = moe_tokens(tokens.astype(self.dtype), valid, weights, top_k=self.top_k, impl=self.impl,
                         capacity_factor=self.capacity_factor)
    return y.reshape(b, length, d), finalize_stats(sums, self.top_k)


# ---------------------------------------------------------------- routing and statistics

def route(x, router, top_k: int):
  """x: [T, d]; router: f32 [d, E] -> logits f32 [T, E], probs [T, E], weights f32 [T, k], experts int [T, k]."""
  logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if top_k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, probs, weights, experts


def stat_sums(logits, probs, experts, valid, dropped):
  """Per-shard sums (psum-able) behind the auxiliary losses; padding tokens left out."""
  v = valid.astype(jnp.float32)
  e = probs.shape[-1]
  assigned = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * v[:, None, None], axis=(0, 1))
  lse = jax.nn.logsumexp(logits, axis=-1)
  return dict(tokens=jnp.sum(v), assigned=assigned, prob=jnp.sum(probs * v[:, None], axis=0),
              lse2=jnp.sum(lse * lse * v), dropped=dropped.astype(jnp.float32))


def finalize_stats(sums, top_k: int) -> dict:
  """Switch load-balancing loss E * sum_i f_i * P_i, with f_i the fraction of the top-k assignments
  that go to expert i (divided by k, so sum_i f_i = 1 and a uniform router scores 1) and P_i the
  mean router probability; router z-loss mean(logsumexp(logits)^2); load f [E]; dropped count
  (token-expert assignments over capacity; always 0 for "ragged"). Losses are alpha-free."""
  n = jnp.maximum(sums["tokens"], 1.0)
  load = sums["assigned"] / (n * top_k)
  mean_prob = sums["prob"] / n
  e = load.shape[-1]
  return dict(lb_loss=e * jnp.sum(load * mean_prob), z_loss=sums["lse2"] / n, load=load, dropped=sums["dropped"])


# ---------------------------------------------------------------- expert compute

def _ffn_ragged(xs, sizes, w, matmul):
  """xs: [M, d] sorted by local expert, sizes: int [E_loc] -> [M, d] (rows past sum(sizes) are 0);
  matmul: grouped_matmul with its kernel, or None: the blocked kernel's fused SwiGLU."""
  if matmul is None:
    return blocked_swiglu(xs, sizes, w["gate"], w["up"], w["down"])
  g = matmul(xs, w["gate"], sizes)
  u = matmul(xs, w["up"], sizes)
  return matmul(jax.nn.silu(g) * u, w["down"], sizes)


def _ffn_dense(xs, w):
  """xs: [E_loc, C, d] -> [E_loc, C, d]: one batched matmul per expert."""
  g = jnp.einsum("ecd,edf->ecf", xs, w["gate"])
  u = jnp.einsum("ecd,edf->ecf", xs, w["up"])
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, w["down"])


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def capacity_slots(experts, valid, num_experts: int, cap: int):
  """Slot e * cap + position of each assignment in expert e's queue, or -1 if dropped or padding.

  experts: int [T, k]. Queue order is choice-major: (choice rank, token index). Returns
  (slots int [T, k], number of dropped assignments).
  """
  t, k = experts.shape
  e = experts.T.reshape(-1)  # [k*T], choice-major
  ok = jnp.tile(valid, k)
  onehot = jax.nn.one_hot(e, num_experts, dtype=jnp.int32) * ok[:, None]  # [k*T, E]
  pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), e[:, None], axis=1)[:, 0] - 1
  keep = ok & (pos < cap)
  slots = jnp.where(keep, e * cap + pos, -1)
  return slots.reshape(k, t).T, jnp.sum(ok & ~keep)


def _capacity_path(x, experts, valid, w, num_experts, cap, exchange):
  """Capacity dispatch by scatter into [E*cap, d] slots, gather back. Returns ([T, k, d], dropped)."""
  t, k = experts.shape
  d = x.shape[-1]
  slots, dropped = capacity_slots(experts, valid, num_experts, cap)
  flat = slots.reshape(-1)
  src = jnp.repeat(x, k, axis=0)  # [T*k, d], token-major like `flat`
  buf = jnp.zeros((num_experts * cap, d), x.dtype).at[jnp.where(flat < 0, num_experts * cap, flat)].set(
      src, mode="drop")
  out = exchange(buf.reshape(num_experts, cap, d), lambda xs: _ffn_dense(xs, w))
  ys = out.reshape(num_experts * cap, d).at[flat].get(mode="fill", fill_value=0)
  ys = jnp.where((flat >= 0)[:, None], ys, 0)  # -1 would wrap to the last slot
  return ys.reshape(t, k, d), dropped


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                             axis_name):
  """`jax.lax.ragged_all_to_all`'s result (one slice per shard of `axis_name`) from a fixed-size
  `all_to_all`, each slice padded to the longest one can be (neither operand nor output is
  shorter). For backends without the collective (CPU)."""
  rows = min(operand.shape[0], output.shape[0])
  take = input_offsets[:, None] + jnp.arange(rows)[None]  # [ep, rows]
  blocks = jnp.where((jnp.arange(rows)[None] < send_sizes[:, None])[..., None],
                     operand.at[take].get(mode="fill", fill_value=0), 0)
  got = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)  # [ep(src), rows, d]
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # each source's offset here
  place = jnp.where(jnp.arange(rows)[None] < recv_sizes[:, None], where[:, None] + jnp.arange(rows)[None],
                    output.shape[0])
  return output.at[place].set(got, mode="drop")


def _ragged_path(x, experts, w, num_experts, ep, axis, matmul, all_to_all):
  """Dropless: assignments sorted by expert, grouped matmul on each shard's local experts.

  With ep > 1 the sorted rows go to the shards holding their experts and come back with a ragged
  all-to-all (`all_to_all`: jax.lax.ragged_all_to_all on TPU and GPU, padded_ragged_all_to_all
  on CPU): only routed rows cross the network. Each shard's receive buffer is sized for the
  worst case (every shard routing all its rows here), as dropless routing can. Returns [T, k, d].
  """
  t, k = experts.shape
  d = x.shape[-1]
  flat = experts.reshape(-1)  # [T*k], token-major
  order = jnp.argsort(flat, stable=True)
  xs = x[order // k]  # [T*k, d] sorted by expert, so grouped by destination shard
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
  if ep == 1:
    ys = _ffn_ragged(xs, sizes, w, matmul)
  else:
    e_loc, m = num_experts // ep, t * k
    exclusive = lambda a, axis_=0: jnp.cumsum(a, axis=axis_) - a
    sent = sizes.reshape(ep, e_loc).sum(1)  # rows to each shard [ep]
    table = jax.lax.all_gather(sent, axis)  # [ep(src), ep(dst)]: every shard's sends
    me = jax.lax.axis_index(axis)
    got = table[:, me]  # rows from each source
    # Here: each source's rows in source order, each block sorted by local expert.
    recv = all_to_all(xs, jnp.zeros((ep * m, d), xs.dtype), exclusive(sent), sent,
                      exclusive(table)[me], got, axis_name=axis)
    counts = jax.lax.all_to_all(sizes.reshape(ep, e_loc), axis, 0, 0, tiled=True)  # [ep(src), E_loc]
    group = jnp.searchsorted(jnp.cumsum(counts.reshape(-1)), jnp.arange(ep * m), side="right")
    local = jnp.where(group < ep * e_loc, group % e_loc, e_loc)  # e_loc: an unused row
    order2 = jnp.argsort(local, stable=True)
    out = _ffn_ragged(recv[order2], counts.sum(0), w, matmul)
    out = jnp.where((local < e_loc)[:, None], jnp.zeros_like(out).at[order2].set(out), 0)
    # Back to the sources, each block where it came from in their sorted rows.
    ys = all_to_all(out, jnp.zeros((m, d), out.dtype), exclusive(got), got, exclusive(table, 1)[:, me], sent,
                    axis_name=axis)
  return jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, d)


def _local(x, valid, w, *, num_experts, top_k, impl, capacity_factor, platform, ep=1, axis=None,
           batch_axes=None, tensor_axes=None):
  """One token shard's layer: x [T, d] -> (y [T, d], stat sums); the exchange runs when ep > 1."""
  logits, probs, weights, experts = route(x, w["router"], top_k)
  weights = weights * valid[:, None]
  e_loc = num_experts // ep

  def exchange(buf, fn):
    # buf: [E, C, d] by global expert -> each shard computes its E_loc experts for every source.
    if ep == 1:
      return fn(buf)
    _, c, d = buf.shape
    recv = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # [ep*E_loc (by source), C, d]
    recv = recv.reshape(ep, e_loc, c, d).transpose(1, 0, 2, 3).reshape(e_loc, ep * c, d)
    out = fn(recv).reshape(e_loc, ep, c, d).transpose(1, 0, 2, 3).reshape(ep * e_loc, c, d)
    return jax.lax.all_to_all(out, axis, 0, 0, tiled=True)

  if impl == modes.MoeImpl.CAPACITY:
    cap = capacity(x.shape[0], top_k, num_experts, capacity_factor)
    ys, dropped = _capacity_path(x, experts, valid, w, num_experts, cap, exchange)
  else:
    kernel = kernel_for(impl, platform)
    matmul = None if kernel == modes.MoeImpl.BLOCKED else lambda a, b, s: grouped_matmul(a, b, s, kernel, platform)
    ragged = jax.lax.ragged_all_to_all if platform in ("tpu", "gpu") else padded_ragged_all_to_all
    ys, dropped = _ragged_path(x, experts, w, num_experts, ep, axis, matmul, ragged), jnp.zeros((), jnp.int32)
  y = jnp.einsum("tk,tkd->td", weights, ys.astype(jnp.float32))
  sums = stat_sums(logits, probs, experts, valid, dropped)
  if tensor_axes:
    y = jax.lax.psum(y, tensor_axes)  # experts' mlp dim is split: partial sums
  if batch_axes:
    sums = jax.lax.psum(sums, batch_axes)
  return y.astype(x.dtype), sums


# ---------------------------------------------------------------- sharded entry point

def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_mesh_axes(mesh, rules) -> tuple:
  """The mesh axes the experts are split over (expert parallelism: their sizes' product)."""
  return _axes(shd.logical_to_mesh(("expert", "embed", "mlp"), rules, mesh)[0])


def _active_mesh_and_rules():
  """(mesh, rules) of the active `sharding.use_rules` (active at trace time in training and
  inference), else None."""
  mesh = shd.active_mesh()
  return None if mesh is None else (mesh, shd.active_rules())


def moe_tokens(x, valid, weights, *, top_k: int, impl: str, capacity_factor: float):
  """x: [T, d] (compute dtype), valid: bool [T], weights: router f32 [d, E], gate/up [E, d, f],
  down [E, f, d] -> (y [T, d], stat sums). Sharded by the active rules, else one local call."""
  num_experts = weights["router"].shape[-1]
  active = _active_mesh_and_rules()
  platform = shd.compile_platform()
  kw = dict(num_experts=num_experts, top_k=top_k, impl=impl, capacity_factor=capacity_factor, platform=platform)
  if active is None:
    return _local(x, valid, weights, **kw)
  mesh, rules = active
  spec = lambda names: shd.logical_to_mesh(names, rules, mesh)
  batch_axes = _axes(spec(("batch",))[0])
  expert_axes = expert_mesh_axes(mesh, rules)
  ep, n_shards = shd.axis_size(expert_axes, mesh), shd.axis_size(batch_axes, mesh)
  if x.shape[0] % n_shards:
    if ep > 1 or not shd.lenient():
      # Training: running the layer unsharded would silently change the sharding plan.
      raise ValueError(f"MoE: {x.shape[0]} tokens (batch x length) do not split over the batch mesh axes "
                       f"{batch_axes} ({n_shards} shards), so the layer cannot run sharded"
                       + (f" over its {ep} expert shards" if ep > 1 else "")
                       + "; change config.train.batch_size or config.mesh")
    return _local(x, valid, weights, **kw)  # inference (lenient rules), e.g. a batch of one: unsharded
  tensor_axes = tuple(a for a in _axes(spec(("expert", "embed", "mlp"))[2]) if a not in batch_axes)
  if n_shards == 1 and ep == 1 and not tensor_axes:
    return _local(x, valid, weights, **kw)
  if ep > 1 and not set(expert_axes) <= set(batch_axes):
    raise ValueError(f"MoE: the expert mesh axes {expert_axes} must also shard the batch; add them to "
                     f"the 'batch' entry of config.sharding_rules")
  if num_experts % ep:
    raise ValueError(f"config.model.moe.num_experts={num_experts} does not split over {ep} expert shards "
                     f"(mesh axes {expert_axes}); change config.mesh.expert")
  # Experts: split over expert and (tensor parallel) mlp axes; gathered over embed axes.
  ex, tp = expert_axes or None, tensor_axes or None
  w_specs = dict(router=P(), gate=P(ex, None, tp), up=P(ex, None, tp), down=P(ex, tp, None))
  tok = P(batch_axes or None)
  fn = jax.shard_map(
      lambda x_, v_, w_: _local(x_, v_, w_, ep=ep, axis=expert_axes, batch_axes=batch_axes,
                                tensor_axes=tensor_axes, **kw),
      # Pallas kernels carry no varying-axes types, nor do the blocked loop's skipped (zero)
      # blocks: shard_map cannot check them.
      mesh=mesh, in_specs=(tok, tok, w_specs), out_specs=(tok, P()),
      check_vma=kernel_for(impl, platform) not in (modes.MoeImpl.MEGABLOX, modes.MoeImpl.TOKAMAX,
                                                   modes.MoeImpl.BLOCKED))
  return fn(x, valid, weights)


def upcycle_dense_mlp(gate, up, down, num_experts: int, noise: float = 0.0, key=None):
  """A trained dense SwiGLU (gate/up [..., d, f], down [..., f, d]) copied into every expert.

  Leading axes (e.g. stacked layers) are kept and the expert axis goes right before d / f.
  `noise` > 0 multiplies each copy by (1 + noise * N(0, 1)) so the experts can diverge.
  Returns dict(gate, up, down) shaped [..., E, d, f] / [..., E, f, d].
  """
  out = {}
  for i, (name, w) in enumerate((("gate", gate), ("up", up), ("down", down))):
    w = jnp.asarray(w)
    tiled = jnp.broadcast_to(jnp.expand_dims(w, -3), w.shape[:-2] + (num_experts,) + w.shape[-2:])
    if noise:
      tiled = tiled * (1 + noise * jax.random.normal(jax.random.fold_in(key, i), tiled.shape, tiled.dtype))
    out[name] = tiled
  return out
