"""Metric families, one module each: world_model (Manhattan / street grid), rank (effective rank),
probes (linear probes by offset), perplexity (token, WikiText rolling word, LAMBADA).
Path-Star, Countdown and A5 (path_star, countdown, a5) share the helpers below: next-token logits of
any objective (GPT, NextLat, MTP's head 0, JTP's Fetch slot 0, BST's forward state with an empty
suffix), a jitted completion loop for prompts of one length (a full forward per new token, no KV
cache: at most 17 new tokens here; nextlat_jax.decoding has the KV-cache decoder for GPT / NextLat)
and fixed-size batching over the objective's mesh."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nextlat_jax.data.packing import segment_ids_and_positions
from nextlat_jax.models.transformer import unembed
from nextlat_jax.parallel import sharding


def next_token_logits(config: Any, objective: Any, params: Any, tokens_BxT: jax.Array,
                      segment_ids_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  """logits_BxTxV (float32): the model's next-token distribution after every position."""
  name, modules = objective.name, objective.modules
  args = (tokens_BxT, segment_ids_BxT, positions_BxT)
  head_DxV = params["trunk"]["head"]
  if name in ("gpt", "nextlat", "mtp_deepseek"):
    h_BxTxD, _ = modules["trunk"].apply({"params": params["trunk"]}, *args)
    return unembed(h_BxTxD, head_DxV)
  if name == "mtp":
    from nextlat_jax.objectives import mtp
    batch = dict(tokens=tokens_BxT, segment_ids=segment_ids_BxT, positions=positions_BxT)
    return unembed(mtp.representations(modules, params, batch)["head0"], head_DxV)
  if name == "jtp":
    h_BxTxD, e_BxTxD = modules["trunk"].apply({"params": params["trunk"]}, *args)
    o_BxTx1xD = modules["fetch"].apply({"params": params["fetch"]}, h_BxTxD, e_BxTxD[:, :, None])
    return unembed(o_BxTx1xD[:, :, 0], head_DxV)
  if name == "bst":
    from nextlat_jax.objectives import bst
    f_BxTxD, _ = modules["trunk"].apply({"params": params["trunk"]}, *args)
    return bst.next_token_logits(modules, params, f_BxTxD, int(config.data.eos_id))
  raise ValueError(f"objective.name={name!r}: the task metrics have no next-token logits for it")


def pick(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
  """Greedy (temperature 0; the first arg-max on ties) or a sample at the temperature."""
  greedy = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  sampled = jax.random.categorical(key, logits_BxV / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


def make_completer(config: Any, objective: Any, num_new: int) -> Callable:
  """Jitted (params, prompt_BxP, key, temperature) -> new tokens (B, num_new) int32.

  All prompts of a call have the same length P; each new token costs one full forward over the
  (P + num_new - 1)-token buffer (causal, so its unfilled tail does not matter)."""
  eos_id = int(config.data.eos_id)

  def complete(params, prompt_BxP, key, temperature):
    B, P = prompt_BxP.shape
    buf_BxL = jnp.concatenate([prompt_BxP.astype(jnp.int32), jnp.zeros((B, num_new), jnp.int32)], axis=1)

    def body(k, buf_BxL):
      x_BxT = buf_BxL[:, :-1]
      seg_BxT, pos_BxT = segment_ids_and_positions(x_BxT, eos_id)
      logits_BxTxV = next_token_logits(config, objective, params, x_BxT, seg_BxT, pos_BxT)
      logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, P - 1 + k, axis=1, keepdims=False)
      x_B = pick(logits_BxV, jax.random.fold_in(key, k), temperature)
      return jax.lax.dynamic_update_index_in_dim(buf_BxL, x_B, P + k, axis=1)

    return jax.lax.fori_loop(0, num_new, body, buf_BxL)[:, P:]

  return make_jit(objective, complete)


def _mesh(objective: Any):
  return getattr(objective.modules.get("trunk"), "mesh", None)


def make_jit(objective: Any, fn: Callable) -> Callable:
  """jax.jit, with replicated outputs when the objective is bound to a mesh."""
  mesh = _mesh(objective)
  return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=sharding.replicated(mesh))


def data_parallel_size(objective: Any) -> int:
  mesh = _mesh(objective)
  return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def place_rows(config: Any, objective: Any, x: np.ndarray) -> jax.Array:
  """Host rows -> a global array with rows over the batch axes (every process passes the same rows)."""
  mesh = _mesh(objective)
  x = np.asarray(x)
  if mesh is None:
    return jnp.asarray(x)
  spec = sharding.batch_sharding(mesh, sharding.logical_rules(config)).spec
  target = NamedSharding(mesh, PartitionSpec(spec[0], *([None] * (x.ndim - 1))))
  return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])


def map_batches(config: Any, objective: Any, fn: Callable, arrays: list[np.ndarray], batch_size: int,
                progress: Callable = lambda it: it) -> list[np.ndarray]:
  """Runs fn(b, *rows_of_batch_b) over all rows in fixed-size batches; concatenates its outputs.

  The last batch is padded by repeating its first row (one compiled shape serves all), batch_size
  is rounded up to a multiple of the data-parallel size, and fn returns an array or a tuple of
  arrays with rows first; they come back as host arrays cut to the number of rows. `progress` wraps
  the batch iterator (e.g. a tqdm bar).
  """
  n = len(arrays[0])
  dp = data_parallel_size(objective)
  B = -(-max(int(batch_size), 1) // dp) * dp
  outs: list[list[np.ndarray]] = []
  for b, start in enumerate(progress(range(0, n, B))):
    chunk = [np.asarray(a[start:start + B]) for a in arrays]
    if len(chunk[0]) < B:
      chunk = [np.concatenate([c, np.repeat(c[:1], B - len(c), axis=0)]) for c in chunk]
    res = fn(b, *[place_rows(config, objective, c) for c in chunk])
    res = jax.device_get(res if isinstance(res, tuple) else (res,))
    if not outs:
      outs = [[] for _ in res]
    for o, r in zip(outs, res):
      o.append(np.asarray(r))
  return [np.concatenate(o)[:n] for o in outs]
