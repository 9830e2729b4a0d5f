"""The decoder-only trunk shared by NextLat and every baseline (spec METHOD.md section 1).

Pre-norm blocks (RMSNorm eps 1e-5 with a learnable scale), fused bias-free QKV, RoPE (rotate-half,
document-relative positions), SwiGLU, untied embedding and bias-free head, N(0, 0.02) init.
`Transformer.__call__` returns h (the output of the final norm, float32) and e = E[x]. The head weight is
a trunk parameter (`params['head']`, D x V; the input table is `params['embed']`, V x D) applied with
`unembed`, so objectives can freeze it.

Cache mode (decoding): `Transformer` / `Stack` / `Block` take an optional `KVCache`, the K/V of the stack's
layers over S slots per row plus where this call's T new tokens go (`start_B`) and what they see
(`mask_Bx1xTxS`). Each block puts its new K/V at slots start_B[b] + t of its layer's buffers, attends over
every slot with that mask (`models/attention.attend` on a dense mask: `jax.nn.dot_product_attention`, to
which "flash" routes a slot mask) and returns its new rows; the buffers' layer axis is scanned with the
layers (`nn.scan` in_axes 0) and the stack writes every layer's rows into them in place. An explicit
argument rather than Flax's `variables["cache"]` (lm1b): the parameter tree and `init` stay untouched,
the cache is a plain pytree that decoding owns (rows left-aligned with per-row offsets, rollback =
resetting a length, one buffer shared by MTP's trunk and heads), and no `mutable=` plumbing. Slot
bookkeeping (layout, masks, rollback) lives in `nextlat_jax.decoding.kv_cache`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nextlat_jax.models.attention import attend, document_mask, uses_segment_ids

Array = jax.Array
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layer: int
  n_head: int
  ffn_width: int = 0  # 0: the reference's SwiGLU width (`ffn_width`)
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str | None = None  # None (JAX picks), "xla", "cudnn", "flash", "auto" (models/attention.py)

  @property
  def ffn(self) -> int:
    return ffn_width(self.d_model, self.ffn_width)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @classmethod
  def from_config(cls, model_cfg: Any) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_cfg.items() if k in fields})


def ffn_width(d_model: int, width: int = 0) -> int:
  """The SwiGLU width: `width` when set (> 0), else the reference's 128 * round(8 d_model / 3 / 128)."""
  return int(width) or 128 * round(8 * d_model / 3 / 128)


@flax.struct.dataclass
class KVCache:
  """Cache mode of a stack of L blocks: their K/V over S slots per row. This call's T new tokens of row b
  are written at slots start_B[b] .. start_B[b] + T - 1; new token t attends to slot s iff mask[b, 0, t, s]."""
  k_LxBxSxNxH: Array
  v_LxBxSxNxH: Array
  start_B: Array
  mask_Bx1xTxS: Array

  def layers(self, first: int, stop: int) -> "KVCache":
    """The cache of layers first .. stop - 1 (for a stack that holds only those)."""
    return self.replace(k_LxBxSxNxH=self.k_LxBxSxNxH[first:stop], v_LxBxSxNxH=self.v_LxBxSxNxH[first:stop])

  def written(self, k_LxBxTxNxH: Array, v_LxBxTxNxH: Array) -> "KVCache":
    """The cache with every layer's new K/V rows written at slots start_B[b] + t (one scatter each)."""
    write = jax.vmap(write_slots, in_axes=(0, 0, None))
    return self.replace(k_LxBxSxNxH=write(self.k_LxBxSxNxH, k_LxBxTxNxH, self.start_B),
                        v_LxBxSxNxH=write(self.v_LxBxSxNxH, v_LxBxTxNxH, self.start_B))


def write_slots(buf_BxSxNxH: Array, new_BxTxNxH: Array, start_B: Array) -> Array:
  """buf[b, start_B[b] + t] = new[b, t]: a scatter of the new rows only (slots must exist)."""
  B, T = new_BxTxNxH.shape[:2]
  b_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  s_BxT = start_B[:, None] + jnp.arange(T)[None]
  return buf_BxSxNxH.at[b_BxT, s_BxT].set(new_BxTxNxH.astype(buf_BxSxNxH.dtype), indices_are_sorted=True,
                                          unique_indices=True)


def _init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class Constrain:
  """Applies logical-axis sharding constraints to activations when a mesh is given."""

  def __init__(self, mesh: Mesh | None, rules: tuple):
    self.mesh, self.rules = mesh, rules

  def __call__(self, x: Array, names: tuple[str | None, ...]) -> Array:
    if self.mesh is None:
      return x
    return nn.with_logical_constraint(x, names, rules=self.rules, mesh=self.mesh)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"
  out_dtype: Any = None  # None: the input dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.out_dtype or x.dtype)


def rope(x_BxTxNxH: Array, positions_BxT: Array, base: float) -> Array:
  """Rotate-half (Llama layout) rotary embedding at the given integer positions."""
  H = x_BxTxNxH.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  angle_BxTxK = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angle_BxTxK)[:, :, None, :], jnp.sin(angle_BxTxK)[:, :, None, :]
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., : H // 2], x[..., H // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def unembed(h_BxTxD: Array, head_DxV: Array, dtype: Any = jnp.float32) -> Array:
  """logits = h @ W_head, accumulated and returned in float32."""
  return jnp.einsum("btd,dv->btv", h_BxTxD.astype(dtype), head_DxV.astype(dtype),
                    preferred_element_type=jnp.float32)


class Block(nn.Module):
  """One pre-norm block: (x, mask Bx1xTxK over the K keys, positions) -> (x, None); keys are the T tokens
  themselves, or in cache mode (kv = this layer's (k, v) buffers BxSxNxH, start_B) the S slots with the
  block's own K/V in place at slots start_B[b] + t: -> (x, its (k, v) rows BxTxNxH, to be written there).
  Without a mask (None) the block attends block-diagonal causally over `segment_ids_BxT` (the "flash"
  kernels take the ids, models/attention.py)."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, x_BxTxD: Array, mask_Bx1xTxK: Array | None, positions_BxT: Array,
               kv: tuple[Array, Array] | None = None, start_B: Array | None = None,
               segment_ids_BxT: Array | None = None):
    cfg, c = self.cfg, Constrain(self.mesh, self.rules)
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    N, H = cfg.n_head, cfg.head_dim

    y = RMSNorm(cfg.norm_eps, pdtype, name="attn_norm")(x_BxTxD)
    qkv_3xBxTxNxH = nn.DenseGeneral(
        (3, N, H), use_bias=False, dtype=dtype, param_dtype=pdtype, name="qkv",
        kernel_init=_init(cfg.init_std, ("embed", None, "heads", "kv")))(y).transpose(2, 0, 1, 3, 4)
    q, k, v = (c(a, ("activation_batch", "activation_length", "activation_heads", None))
               for a in qkv_3xBxTxNxH)
    q, k = rope(q, positions_BxT, cfg.rope_base), rope(k, positions_BxT, cfg.rope_base)
    if kv is not None:  # attend over the slots with this block's rows in place; return the rows
      rows = k, v
      k, v = write_slots(kv[0], k, start_B), write_slots(kv[1], v, start_B)
      kv = rows
    o_BxTxNxH = attend(q, k, v, impl=cfg.attention_impl, segment_ids_BxT=segment_ids_BxT,
                       mask_Bx1xTxS=mask_Bx1xTxK, mesh=self.mesh, rules=self.rules)
    o_BxTxNxH = c(o_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None))
    x_BxTxD = x_BxTxD + nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype, name="out",
        kernel_init=_init(cfg.init_std, ("heads", "kv", "embed")))(o_BxTxNxH)
    x_BxTxD = c(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))

    y = RMSNorm(cfg.norm_eps, pdtype, name="mlp_norm")(x_BxTxD)
    gate_up_BxTx2xF = nn.DenseGeneral(
        (2, cfg.ffn), use_bias=False, dtype=dtype, param_dtype=pdtype, name="mlp_in",
        kernel_init=_init(cfg.init_std, ("embed", None, "mlp")))(y)
    f_BxTxF = nn.silu(gate_up_BxTx2xF[:, :, 0]) * gate_up_BxTx2xF[:, :, 1]
    f_BxTxF = c(f_BxTxF, ("activation_batch", "activation_length", "activation_mlp"))
    x_BxTxD = x_BxTxD + nn.Dense(
        cfg.d_model, use_bias=False, dtype=dtype, param_dtype=pdtype, name="mlp_out",
        kernel_init=_init(cfg.init_std, ("mlp", "embed")))(f_BxTxF)
    x_BxTxD = c(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxTxD, kv


def _remat_policy(name: str):
  return {"full": None,
          "dots": jax.checkpoint_policies.checkpoint_dots,
          "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class Transformer(nn.Module):
  """tokens, segment_ids, positions (B, T) -> (h_BxTxD float32 post-final-norm, e_BxTxD = E[x]); in cache
  mode (`cache` given, segment_ids unused: cache.mask_Bx1xTxS says what each token sees) -> (h, e, cache)
  with this call's K/V written."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, tokens_BxT: Array, segment_ids_BxT: Array | None, positions_BxT: Array,
               cache: KVCache | None = None):
    cfg, c = self.cfg, Constrain(self.mesh, self.rules)
    pdtype = DTYPES[cfg.param_dtype]
    e_BxTxD = embed_with_head(self, tokens_BxT)
    x_BxTxD, cache = run_blocks(self, e_BxTxD, segment_ids_BxT, positions_BxT, cache)
    h_BxTxD = RMSNorm(cfg.norm_eps, pdtype, name="final_norm", out_dtype=jnp.float32)(x_BxTxD)
    h_BxTxD = c(h_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return (h_BxTxD, e_BxTxD) if cache is None else (h_BxTxD, e_BxTxD, cache)


def embed_with_head(module: nn.Module, tokens_BxT: Array) -> Array:
  """Declares `embed` (V, D) and `head` (D, V) in `module`'s scope and returns E[x]."""
  cfg, c = module.cfg, Constrain(module.mesh, module.rules)
  pdtype = DTYPES[cfg.param_dtype]
  table_VxD = module.param("embed", _init(cfg.init_std, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
                           pdtype)
  module.param("head", _init(cfg.init_std, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size), pdtype)
  # Gather from a replicated copy (as FSDP gathers every weight) so the lookup shards like the batch.
  e_BxTxD = jnp.take(c(table_VxD, (None, None)), tokens_BxT, axis=0)
  return c(e_BxTxD, ("activation_batch", "activation_length", "activation_embed"))


class _Embed(nn.Module):
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, tokens_BxT: Array) -> Array:
    return embed_with_head(self, tokens_BxT)


def embed(cfg: ModelConfig, trunk_params: Any, tokens_BxT: Array) -> Array:
  """E[x] from a trunk's params (of any module that declared them with `embed_with_head`)."""
  return _Embed(cfg).apply({"params": trunk_params}, tokens_BxT)


def run_blocks(module: nn.Module, x_BxTxD: Array, segment_ids_BxT: Array | None, positions_BxT: Array,
               cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
  """module.cfg.n_layer blocks (scanned as `blocks`, or `block_{i}`) inside `module`'s scope; returns
  (x, the cache with every layer's new K/V written, or None without one)."""
  cfg = module.cfg
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
  x_BxTxD = x_BxTxD.astype(DTYPES[cfg.dtype])
  if cache is None and uses_segment_ids(cfg.attention_impl):  # the kernel takes the ids: no T x T mask
    mask, kv_args, kv_axes = None, (None, None, segment_ids_BxT), (nn.broadcast,) * 3
  elif cache is None:
    mask, kv_args, kv_axes = document_mask(segment_ids_BxT), (), ()
  else:  # each layer reads its slice of the buffers; the slot mask and offsets are shared
    mask = cache.mask_Bx1xTxS
    kv_args, kv_axes = ((cache.k_LxBxSxNxH, cache.v_LxBxSxNxH), cache.start_B), (0, nn.broadcast)
  if cfg.scan_layers:
    x_BxTxD, kv = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast) + kv_axes, length=cfg.n_layer,
                          metadata_params={nn.PARTITION_NAME: "layers"})(
                              cfg, module.mesh, module.rules, name="blocks", parent=module)(
                                  x_BxTxD, mask, positions_BxT, *kv_args)
  else:
    kvs = []
    for i in range(cfg.n_layer):
      layer_args = kv_args if cache is None else ((cache.k_LxBxSxNxH[i], cache.v_LxBxSxNxH[i]), cache.start_B)
      x_BxTxD, kv_i = block(cfg, module.mesh, module.rules, name=f"block_{i}", parent=module)(
          x_BxTxD, mask, positions_BxT, *layer_args)
      kvs.append(kv_i)
    kv = None if cache is None else tuple(jnp.stack(layers) for layers in zip(*kvs))
  # The blocks return their new rows (scanned out: L x B x T, not the L x B x S buffers), written here
  # in place once: a block writing its slice of the buffers would copy every layer out and back.
  return x_BxTxD, None if cache is None else cache.written(*kv)


class Stack(nn.Module):
  """cfg.n_layer blocks over already-embedded inputs, then the final RMSNorm unless final_norm=False:
  the Transformer without its embedding and head (param names as in Transformer: `blocks` or
  `block_{i}`, `final_norm`). Additive; used by baselines with a second or shorter stack (BST's
  backward encoder, MTP's trunk). Returns float32 after the norm, the compute dtype without it; in cache
  mode (as Transformer's) (h, cache)."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()
  final_norm: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array, segment_ids_BxT: Array | None, positions_BxT: Array,
               cache: KVCache | None = None):
    cfg, c = self.cfg, Constrain(self.mesh, self.rules)
    x_BxTxD, cache = run_blocks(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache)
    if self.final_norm:
      h_BxTxD = RMSNorm(cfg.norm_eps, DTYPES[cfg.param_dtype], name="final_norm", out_dtype=jnp.float32)(x_BxTxD)
      x_BxTxD = c(h_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BxTxD if cache is None else (x_BxTxD, cache)
