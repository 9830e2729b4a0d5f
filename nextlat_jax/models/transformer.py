"""The decoder-only trunk shared by NextLat and every baseline (spec METHOD.md section 1).

Pre-norm blocks (RMSNorm eps 1e-5 with a learnable scale), fused bias-free QKV, RoPE (rotate-half,
document-relative positions), SwiGLU, untied embedding and bias-free head, N(0, 0.02) init.
`Transformer.__call__` returns h (the output of the final norm, float32) and e = E[x]. The head weight is
a trunk parameter (`params['head']`, D x V; the input table is `params['embed']`, V x D) applied with
`unembed`, so objectives can freeze it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

Array = jax.Array
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layer: int
  n_head: int
  ffn_width: int = 0  # 0: 128 * round(8D/3/128), the reference's SwiGLU width
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "none"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str | None = None  # None (XLA picks), "xla" or "cudnn"

  @property
  def ffn(self) -> int:
    return self.ffn_width or 128 * round(8 * self.d_model / 3 / 128)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @classmethod
  def from_config(cls, model_cfg: Any) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_cfg.items() if k in fields})


def ffn_width(d_model: int) -> int:
  return 128 * round(8 * d_model / 3 / 128)


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


def document_mask(segment_ids_BxT: Array) -> Array:
  """Block-diagonal causal mask (B, 1, T, T): t attends to s iff s <= t and same document."""
  T = segment_ids_BxT.shape[1]
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
  return (same_BxTxT & causal_TxT)[:, None]


def unembed(h_BxTxD: Array, head_DxV: Array, dtype: Any = jnp.float32) -> Array:
  """logits = h @ W_head, accumulated and returned in float32."""
  return jnp.einsum("btd,dv->btv", h_BxTxD.astype(dtype), head_DxV.astype(dtype),
                    preferred_element_type=jnp.float32)


class Block(nn.Module):
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, x_BxTxD: Array, mask_Bx1xTxT: Array, positions_BxT: Array):
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
    o_BxTxNxH = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xTxT,
                                             implementation=cfg.attention_impl)
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
    return x_BxTxD, None


def _remat_policy(name: str):
  return {"full": None,
          "dots": jax.checkpoint_policies.checkpoint_dots,
          "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class Transformer(nn.Module):
  """tokens, segment_ids, positions (B, T) -> (h_BxTxD float32 post-final-norm, e_BxTxD = E[x])."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, tokens_BxT: Array, segment_ids_BxT: Array, positions_BxT: Array):
    cfg, c = self.cfg, Constrain(self.mesh, self.rules)
    pdtype = DTYPES[cfg.param_dtype]
    e_BxTxD = embed_with_head(self, tokens_BxT)
    x_BxTxD = run_blocks(self, e_BxTxD, segment_ids_BxT, positions_BxT)
    h_BxTxD = RMSNorm(cfg.norm_eps, pdtype, name="final_norm", out_dtype=jnp.float32)(x_BxTxD)
    return c(h_BxTxD, ("activation_batch", "activation_length", "activation_embed")), e_BxTxD


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


def run_blocks(module: nn.Module, x_BxTxD: Array, segment_ids_BxT: Array, positions_BxT: Array) -> Array:
  """module.cfg.n_layer blocks (scanned as `blocks`, or `block_{i}`) inside `module`'s scope."""
  cfg = module.cfg
  mask = document_mask(segment_ids_BxT)
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
  x_BxTxD = x_BxTxD.astype(DTYPES[cfg.dtype])
  if cfg.scan_layers:
    x_BxTxD, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layer,
                         metadata_params={nn.PARTITION_NAME: "layers"})(
                             cfg, module.mesh, module.rules, name="blocks", parent=module)(
                                 x_BxTxD, mask, positions_BxT)
  else:
    for i in range(cfg.n_layer):
      x_BxTxD, _ = block(cfg, module.mesh, module.rules, name=f"block_{i}", parent=module)(
          x_BxTxD, mask, positions_BxT)
  return x_BxTxD


class Stack(nn.Module):
  """cfg.n_layer blocks over already-embedded inputs, then the final RMSNorm unless final_norm=False:
  the Transformer without its embedding and head (param names as in Transformer: `blocks` or
  `block_{i}`, `final_norm`). Additive; used by baselines with a second or shorter stack (BST's
  backward encoder, MTP's trunk). Returns float32 after the norm, the compute dtype without it."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  rules: tuple = ()
  final_norm: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: Array, segment_ids_BxT: Array, positions_BxT: Array) -> Array:
    cfg, c = self.cfg, Constrain(self.mesh, self.rules)
    x_BxTxD = run_blocks(self, x_BxTxD, segment_ids_BxT, positions_BxT)
    if not self.final_norm:
      return x_BxTxD
    h_BxTxD = RMSNorm(cfg.norm_eps, DTYPES[cfg.param_dtype], name="final_norm", out_dtype=jnp.float32)(x_BxTxD)
    return c(h_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
