"""A KV cache for decoding: allocation, slot bookkeeping and rollback; the math is the model's own
`Transformer` in cache mode (`nextlat_jax.models.transformer.KVCache`): each call runs the trunk on a
block of T new tokens, attending to every cached slot of the same document.

Layout: rows are left-aligned. Row b holds its tokens in slots 0..length_B[b]-1; a call writes its block
at slots length..length+T-1 and then advances the length. Document ids and RoPE positions continue
from the last cached slot exactly as in the batch contract (nextlat_jax.data.packing): an EOS starts a
new document with position 0, the first token of a row has position 1. Rolling back is resetting
`length_B`: slots at or past the length are never read (the mask is causal in slot index) and are
overwritten by the next write. The buffer must hold length + T slots at every call (the caller sizes
it; writes past the end would be clamped or dropped).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from nextlat_jax.data.packing import segment_ids_and_positions
from nextlat_jax.models.transformer import DTYPES, KVCache, ModelConfig, Transformer, unembed

Array = jax.Array
Params = Any


@flax.struct.dataclass
class Cache:
  k_LxBxSxNxH: Array | None  # None: no K/V kept (the no-cache baseline recomputes from tokens_BxS)
  v_LxBxSxNxH: Array | None
  tokens_BxS: Array  # int32 token of each slot
  segment_BxS: Array  # int32 document id of each slot
  position_BxS: Array  # int32 RoPE position of each slot
  length_B: Array  # int32 number of valid slots per row


def init_cache(cfg: ModelConfig, batch: int, size: int, keep_kv: bool = True) -> Cache:
  """An empty cache of `size` slots per row."""
  kv_shape = (cfg.n_layer, batch, size, cfg.n_head, cfg.head_dim)
  kv = (lambda: jnp.zeros(kv_shape, DTYPES[cfg.dtype])) if keep_kv else (lambda: None)
  slots = lambda: jnp.zeros((batch, size), jnp.int32)
  # Separate buffers (not one zeros array five times), so a fresh cache can be donated to a jitted call.
  return Cache(kv(), kv(), slots(), slots(), slots(), jnp.zeros((batch,), jnp.int32))


def rollback(cache: Cache, length_B: Array) -> Cache:
  """Keep only the first length_B[b] slots of each row."""
  return cache.replace(length_B=length_B.astype(jnp.int32))


def _last(x_BxS: Array, length_B: Array) -> Array:
  """x at slot length-1 per row, 0 where the row is empty (the virtual EOS before a row)."""
  idx = jnp.maximum(length_B - 1, 0)
  return jnp.where(length_B > 0, jnp.take_along_axis(x_BxS, idx[:, None], axis=1)[:, 0], 0)


def block_layout(cache: Cache, tokens_BxT: Array, eos_id: int | Array) -> tuple[Array, Array]:
  """(segment_ids, positions) of a block appended to the cache, continuing the batch contract."""
  return segment_ids_and_positions(tokens_BxT, eos_id, _last(cache.segment_BxS, cache.length_B),
                                   _last(cache.position_BxS, cache.length_B))


def write_rows(buf_BxSx: Array, new_BxTx: Array, start_B: Array) -> Array:
  """buf[b, start_B[b]:start_B[b]+T] = new[b] for every row b."""
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0))(
      buf_BxSx, new_BxTx.astype(buf_BxSx.dtype), start_B)


def append_block(cache: Cache, tokens_BxT: Array, eos_id: int | Array) -> tuple[Cache, Array, KVCache]:
  """Writes a block's tokens / segment ids / positions after each row's cached slots (the length is
  not advanced yet); returns (cache, positions_BxT, the model's KVCache: every layer's K/V, the block's
  start slots and its attention mask Bx1xTxS over all slots)."""
  T, S = tokens_BxT.shape[1], cache.tokens_BxS.shape[1]
  start_B = cache.length_B
  segment_BxT, positions_BxT = block_layout(cache, tokens_BxT, eos_id)
  segment_BxS = write_rows(cache.segment_BxS, segment_BxT, start_B)
  cache = cache.replace(tokens_BxS=write_rows(cache.tokens_BxS, tokens_BxT, start_B),
                        segment_BxS=segment_BxS,
                        position_BxS=write_rows(cache.position_BxS, positions_BxT, start_B))
  t_abs_BxT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)
  visible_BxTxS = ((jnp.arange(S, dtype=jnp.int32)[None, None, :] <= t_abs_BxT[:, :, None])
                   & (segment_BxS[:, None, :] == segment_BxT[:, :, None]))
  return cache, positions_BxT, KVCache(cache.k_LxBxSxNxH, cache.v_LxBxSxNxH, start_B, visible_BxTxS[:, None])


def commit(cache: Cache, kv: KVCache, n_valid_B: Array | None, block: int) -> Cache:
  """The cache after a model call on a block: its K/V, and the length advanced by the block (or by
  n_valid_B, e.g. the real lengths of right-padded prompts)."""
  return cache.replace(k_LxBxSxNxH=kv.k_LxBxSxNxH, v_LxBxSxNxH=kv.v_LxBxSxNxH,
                       length_B=kv.start_B + advanced(n_valid_B, kv.start_B.shape[0], block))


def extend(trunk_params: Params, cfg: ModelConfig, cache: Cache, tokens_BxT: Array, eos_id: int | Array,
           n_valid_B: Array | None = None) -> tuple[Array, Cache]:
  """Runs the trunk on a block appended to each row: (h_BxTxD float32 post-final-norm, new cache).

  The length advances by T, or by n_valid_B (e.g. the real lengths of right-padded prompts); the
  slots beyond it hold scratch and are overwritten later.
  """
  cache, positions_BxT, kv = append_block(cache, tokens_BxT, eos_id)
  h_BxTxD, _, kv = Transformer(cfg).apply({"params": trunk_params}, tokens_BxT, None, positions_BxT, kv)
  return h_BxTxD, commit(cache, kv, n_valid_B, tokens_BxT.shape[1])


def advanced(n_valid_B: Array | None, batch: int, block: int) -> Array:
  """How far each row's length moves after a block: the block, or the valid part of it."""
  return jnp.full((batch,), block, jnp.int32) if n_valid_B is None else n_valid_B.astype(jnp.int32)


def extend_nocache(trunk_params: Params, cfg: ModelConfig, cache: Cache, tokens_BxT: Array, eos_id: int | Array,
                   bucket: int = 32) -> tuple[Array, Cache]:
  """`extend` without K/V: reruns the full trunk over every stored token (the paper's no-cache harness).

  The forward covers the first multiple of `bucket` slots that holds every row (lax.switch over the
  multiples), so its cost grows with the sequence as in a dynamic-shape loop, to within `bucket` slots.
  """
  B, T = tokens_BxT.shape
  S = cache.tokens_BxS.shape[1]
  start_B = cache.length_B
  tokens_BxS = write_rows(cache.tokens_BxS, tokens_BxT, start_B)
  sizes = list(range(bucket, S, bucket)) + [S]

  def run(size: int):
    def fn(tokens_BxS):
      segment_BxL, positions_BxL = segment_ids_and_positions(tokens_BxS[:, :size], eos_id)
      h_BxLxD, _ = Transformer(cfg).apply({"params": trunk_params}, tokens_BxS[:, :size], segment_BxL,
                                          positions_BxL)
      idx_BxT = jnp.minimum(start_B[:, None] + jnp.arange(T), size - 1)
      return jnp.take_along_axis(h_BxLxD, idx_BxT[:, :, None], axis=1)
    return fn

  need = jnp.max(start_B) + T
  branch = jnp.searchsorted(jnp.asarray(sizes), need)
  h_BxTxD = jax.lax.switch(jnp.minimum(branch, len(sizes) - 1), [run(s) for s in sizes], tokens_BxS)
  segment_BxT, positions_BxT = block_layout(cache, tokens_BxT, eos_id)
  return h_BxTxD, cache.replace(tokens_BxS=tokens_BxS,
                                segment_BxS=write_rows(cache.segment_BxS, segment_BxT, start_B),
                                position_BxS=write_rows(cache.position_BxS, positions_BxT, start_B),
                                length_B=start_B + T)


def prefill(trunk_params: Params, cfg: ModelConfig, tokens_BxP: Array, lengths_B: Array, eos_id: int | Array,
            size: int, keep_kv: bool = True) -> tuple[Array, Cache]:
  """Caches right-padded prompts (row b: tokens_BxP[b, :lengths_B[b]]); returns h at every prompt slot."""
  cache = init_cache(cfg, tokens_BxP.shape[0], size, keep_kv)
  if keep_kv:
    return extend(trunk_params, cfg, cache, tokens_BxP, eos_id, lengths_B)
  h_BxPxD, cache = extend_nocache(trunk_params, cfg, cache, tokens_BxP, eos_id)
  return h_BxPxD, rollback(cache, lengths_B)


def logits_at(trunk_params: Params, cfg: ModelConfig, h_xD: Array) -> Array:
  """Next-token logits (float32) from post-norm hidden states of any leading shape."""
  h_Nx1xD = h_xD.reshape(-1, 1, h_xD.shape[-1])
  logits_Nx1xV = unembed(h_Nx1xD, trunk_params["head"], DTYPES[cfg.dtype])
  return logits_Nx1xV.reshape(*h_xD.shape[:-1], logits_Nx1xV.shape[-1])
