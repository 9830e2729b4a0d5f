"""A KV cache and the trunk's cached forward, as pure functions over the Transformer's own params.

Same parameter tree and math as `nextlat_jax.models.transformer.Transformer` (blocks stacked under
`blocks/...` when scan_layers, else `block_{i}/...`; RMSNorm, RoPE, SwiGLU, untied head), but the
trunk runs on a block of T new tokens per call, attending to every cached slot of the same document.

Layout: rows are left-aligned. Row b holds its tokens in slots 0..length_B[b]-1; a call writes its block
at slots length..length+T-1 and then advances the length. Document ids and RoPE positions continue
from the last cached slot exactly as in the batch contract (nextlat_jax.data.packing): an EOS starts a
new document with position 0, the first token of a row has position 1. Rolling back is resetting
`length_B`: slots at or past the length are never read (the mask is causal in slot index) and are
overwritten by the next write. The buffer must hold length + T slots at every call (the caller sizes
it; `dynamic_update_slice` would clamp otherwise).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from nextlat_jax.models.transformer import DTYPES, ModelConfig, rope, unembed

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
  kv = None
  if keep_kv:
    kv = jnp.zeros((cfg.n_layer, batch, size, cfg.n_head, cfg.head_dim), DTYPES[cfg.dtype])
  zeros = jnp.zeros((batch, size), jnp.int32)
  return Cache(kv, kv, zeros, zeros, zeros, jnp.zeros((batch,), jnp.int32))


def rollback(cache: Cache, length_B: Array) -> Cache:
  """Keep only the first length_B[b] slots of each row."""
  return cache.replace(length_B=length_B.astype(jnp.int32))


def _last(x_BxS: Array, length_B: Array) -> Array:
  """x at slot length-1 per row, 0 where the row is empty (the virtual EOS before a row)."""
  idx = jnp.maximum(length_B - 1, 0)
  return jnp.where(length_B > 0, jnp.take_along_axis(x_BxS, idx[:, None], axis=1)[:, 0], 0)


def block_layout(cache: Cache, tokens_BxT: Array, eos_id: int | Array) -> tuple[Array, Array]:
  """(segment_ids, positions) of a block appended to the cache, continuing the batch contract."""
  T = tokens_BxT.shape[1]
  prev_seg_B, prev_pos_B = _last(cache.segment_BxS, cache.length_B), _last(cache.position_BxS, cache.length_B)
  is_eos_BxT = tokens_BxT == eos_id
  segment_BxT = prev_seg_B[:, None] + jnp.cumsum(is_eos_BxT, axis=1, dtype=jnp.int32)
  t_T = jnp.arange(T, dtype=jnp.int32)
  last_eos_BxT = jax.lax.cummax(jnp.where(is_eos_BxT, t_T, -1), axis=1)
  positions_BxT = jnp.where(last_eos_BxT >= 0, t_T - last_eos_BxT, prev_pos_B[:, None] + t_T + 1)
  return segment_BxT, positions_BxT.astype(jnp.int32)


def write_rows(buf_BxSx: Array, new_BxTx: Array, start_B: Array) -> Array:
  """buf[b, start_B[b]:start_B[b]+T] = new[b] for every row b."""
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0))(
      buf_BxSx, new_BxTx.astype(buf_BxSx.dtype), start_B)


def rms(x: Array, scale: Array, eps: float, out_dtype: Any = None) -> Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(out_dtype or x.dtype)


def _write_layer(buf_LxBxSxNxH: Array, new_BxTxNxH: Array, layer: Array | int, start_B: Array) -> Array:
  """buf[layer, b, start_B[b]:start_B[b]+T] = new[b]: a scatter of the new rows only."""
  B, T = new_BxTxNxH.shape[:2]
  b_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  s_BxT = start_B[:, None] + jnp.arange(T)[None]
  return buf_LxBxSxNxH.at[layer, b_BxT, s_BxT].set(new_BxTxNxH.astype(buf_LxBxSxNxH.dtype),
                                                   indices_are_sorted=True, unique_indices=True)


def cached_block(lp: Params, cfg: ModelConfig, x_BxTxD: Array, k_all: Array, v_all: Array, layer: Array | int,
           start_B: Array, positions_BxT: Array, mask_Bx1xTxS: Array):
  """One pre-norm block on the new tokens; returns (x, k cache, v cache) with the block's K/V written."""
  dtype = DTYPES[cfg.dtype]
  y = rms(x_BxTxD, lp["attn_norm"]["scale"], cfg.norm_eps)
  qkv_3xBxTxNxH = jnp.einsum("btd,dcnh->cbtnh", y.astype(dtype), lp["qkv"]["kernel"].astype(dtype))
  q, k, v = qkv_3xBxTxNxH[0], qkv_3xBxTxNxH[1], qkv_3xBxTxNxH[2]
  q, k = rope(q, positions_BxT, cfg.rope_base), rope(k, positions_BxT, cfg.rope_base)
  k_all, v_all = _write_layer(k_all, k, layer, start_B), _write_layer(v_all, v, layer, start_B)
  o_BxTxNxH = jax.nn.dot_product_attention(q, k_all[layer].astype(dtype), v_all[layer].astype(dtype),
                                           mask=mask_Bx1xTxS)
  x_BxTxD = x_BxTxD + jnp.einsum("btnh,nhd->btd", o_BxTxNxH, lp["out"]["kernel"].astype(dtype))
  y = rms(x_BxTxD, lp["mlp_norm"]["scale"], cfg.norm_eps)
  gate_up_BxTx2xF = jnp.einsum("btd,dcf->btcf", y.astype(dtype), lp["mlp_in"]["kernel"].astype(dtype))
  f_BxTxF = jax.nn.silu(gate_up_BxTx2xF[:, :, 0]) * gate_up_BxTx2xF[:, :, 1]
  x_BxTxD = x_BxTxD + jnp.einsum("btf,fd->btd", f_BxTxF, lp["mlp_out"]["kernel"].astype(dtype))
  return x_BxTxD, k_all, v_all


def append_block(cache: Cache, tokens_BxT: Array, eos_id: int | Array) -> tuple[Cache, Array, Array]:
  """Writes a block's tokens / segment ids / positions after each row's cached slots (the length is
  not advanced yet); returns (cache, positions_BxT, attention mask Bx1xTxS over all slots)."""
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
  return cache, positions_BxT, visible_BxTxS[:, None]


def run_blocks(stack_params: Params, cfg: ModelConfig, n_layer: int, x_BxTxD: Array, k_all: Array, v_all: Array,
               start_B: Array, positions_BxT: Array, mask_Bx1xTxS: Array, first_layer: int = 0):
  """n_layer blocks (`blocks` stacked, or `block_{i}`) on the new tokens, writing cache layers
  first_layer .. first_layer + n_layer - 1; returns (x, k cache, v cache)."""
  if "blocks" in stack_params:
    def body(carry, lp_i):
      x, k_all, v_all = carry
      lp, i = lp_i
      return cached_block(lp, cfg, x, k_all, v_all, i, start_B, positions_BxT, mask_Bx1xTxS), None
    (x_BxTxD, k_all, v_all), _ = jax.lax.scan(
        body, (x_BxTxD, k_all, v_all), (stack_params["blocks"], first_layer + jnp.arange(n_layer)))
    return x_BxTxD, k_all, v_all
  for i in range(n_layer):
    x_BxTxD, k_all, v_all = cached_block(stack_params[f"block_{i}"], cfg, x_BxTxD, k_all, v_all, first_layer + i,
                                   start_B, positions_BxT, mask_Bx1xTxS)
  return x_BxTxD, k_all, v_all


def extend(trunk_params: Params, cfg: ModelConfig, cache: Cache, tokens_BxT: Array, eos_id: int | Array,
           n_valid_B: Array | None = None) -> tuple[Array, Cache]:
  """Runs the trunk on a block appended to each row: (h_BxTxD float32 post-final-norm, new cache).

  The length advances by T, or by n_valid_B (e.g. the real lengths of right-padded prompts); the
  slots beyond it hold scratch and are overwritten later.
  """
  B, T = tokens_BxT.shape
  start_B = cache.length_B
  cache, positions_BxT, mask_Bx1xTxS = append_block(cache, tokens_BxT, eos_id)
  x_BxTxD = jnp.take(trunk_params["embed"], tokens_BxT, axis=0).astype(DTYPES[cfg.dtype])
  x_BxTxD, k_all, v_all = run_blocks(trunk_params, cfg, cfg.n_layer, x_BxTxD, cache.k_LxBxSxNxH, cache.v_LxBxSxNxH,
                                     start_B, positions_BxT, mask_Bx1xTxS)
  h_BxTxD = rms(x_BxTxD, trunk_params["final_norm"]["scale"], cfg.norm_eps, jnp.float32)
  return h_BxTxD, cache.replace(k_LxBxSxNxH=k_all, v_LxBxSxNxH=v_all, length_B=start_B + advanced(n_valid_B, B, T))


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
      fresh = init_cache(cfg, B, size)
      h_BxLxD, _ = extend(trunk_params, cfg, fresh, tokens_BxS[:, :size], eos_id)
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
