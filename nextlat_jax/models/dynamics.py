"""The latent dynamics family p(h_t, x_{t+1}) -> h_{t+1} (spec METHOD.md section 4; `dynamics.kind`).

Every kind reads z = RMSNorm_2D(concat[E(x_{t+1}), h_t]) (embedding first, E is the trunk's own table),
uses bias-free N(0, init_std) Linear layers and exact-erf GELU, and is a residual / gated update of h_t:
- "mlp" (the paper, `Dynamics`): h + Linear(H->D)(GELU(Linear(H->H)(GELU(Linear(2D->H)(z))))).
- "resmlp" (`ResMLPDynamics`): Linear(2D->H), then `layers` pre-norm residual GEGLU blocks of width H
  (x += Linear(H->H)(GELU(gate) * up), [gate, up] = Linear(H->2H)(RMSNorm(x))), then
  h + Linear(H->D)(RMSNorm(x)).
- "gru" (`GRUDynamics`): gates [r, u] = sigmoid(Linear(2D->2D)(z)); candidate
  c = Linear(H->D)(GELU(Linear(2D->H)(RMSNorm_2D(concat[E(x), r * h])))) (no tanh: h is an RMS-normalised
  latent, not bounded in [-1, 1]); h_next = (1 - u) * h + u * c.
- "attn" (`AttnDynamics`, EAGLE-like): one pre-norm transformer block whose query is the current input
  u = Linear(2D->D)(z) and whose keys / values are the last `window` latents predicted earlier in the same
  rollout chain plus u (a learned slot embedding marks each one's distance); then a GELU MLP of width H;
  h_next = h + Linear(D->D)(x).

One function-level interface serves every kind: a chain *carry* (`init_carry`) that is empty `()` for the
stateless kinds and, for "attn", the last `window` predicted latents of the chain with a validity mask
(empty at the chain start, i.e. right after a true trunk state). `apply_dynamics` (E[x] given) and
`dynamics_step` (token ids given) return (h_next, carry); training rollouts (`advance`), the A5 RNN mode
and speculative drafting all go through them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nextlat_jax.errors import need
from nextlat_jax.models.transformer import DTYPES, Constrain, RMSNorm, _init

Array = jax.Array
Carry = Any
KINDS = ("mlp", "resmlp", "gru", "attn")
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")


def _dense(module: nn.Module, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=DTYPES[module.dtype], param_dtype=DTYPES[module.param_dtype],
                  name=name, kernel_init=_init(module.init_std, names))


def _norm(module: nn.Module, name: str) -> RMSNorm:
  return RMSNorm(module.norm_eps, DTYPES[module.param_dtype], axis_name="dyn_norm",
                 out_dtype=DTYPES[module.dtype], name=name)


def _concat(e_BxTxD: Array, h_BxTxD: Array) -> Array:
  return jnp.concatenate([e_BxTxD.astype(jnp.float32), h_BxTxD.astype(jnp.float32)], axis=-1)


class _DynamicsFields(nn.Module):
  """Fields every kind shares (all are built by `dynamics_module` from the model config)."""
  d_model: int
  hidden: int
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  mesh: Mesh | None = None
  rules: tuple = ()


class Dynamics(_DynamicsFields):
  """The paper's 3-layer MLP ("mlp")."""

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array) -> Array:
    c = Constrain(self.mesh, self.rules)
    z_BxTx2D = c(_norm(self, "norm")(_concat(e_BxTxD, h_BxTxD)), ACT_EMBED)
    a_BxTxH = nn.gelu(_dense(self, self.hidden, ("dyn_in", "dyn_hidden"), "fc1")(z_BxTx2D), approximate=False)
    a_BxTxH = c(a_BxTxH, ACT_MLP)
    a_BxTxH = nn.gelu(_dense(self, self.hidden, ("dyn_hidden_in", "dyn_hidden"), "fc2")(a_BxTxH),
                      approximate=False)
    a_BxTxH = c(a_BxTxH, ACT_MLP)
    delta_BxTxD = _dense(self, self.d_model, ("dyn_hidden", "embed"), "fc3")(a_BxTxH)
    return h_BxTxD + delta_BxTxD.astype(h_BxTxD.dtype)


class ResMLPDynamics(_DynamicsFields):
  """A deeper residual MLP ("resmlp"): `layers` pre-norm GEGLU blocks of width `hidden`."""
  layers: int = 2

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array) -> Array:
    c = Constrain(self.mesh, self.rules)
    H = self.hidden
    z_BxTx2D = c(_norm(self, "norm")(_concat(e_BxTxD, h_BxTxD)), ACT_EMBED)
    # The residual stream is replicated over its features (activation_embed): constraining it to
    # `tensor` as well miscomputes on a (data, fsdp, tensor) = (2, 2, 2) CPU mesh (XLA, jax 0.10;
    # tests/test_dynamics_kinds.py), while the GEGLU activations may be split.
    x_BxTxH = c(_dense(self, H, ("dyn_in", "dyn_hidden"), "fc_in")(z_BxTx2D), ACT_EMBED)
    for i in range(self.layers):
      y_BxTxH = _norm(self, f"block_{i}_norm")(x_BxTxH)
      gate_up_BxTx2xH = nn.DenseGeneral(
          (2, H), use_bias=False, dtype=DTYPES[self.dtype], param_dtype=DTYPES[self.param_dtype],
          name=f"block_{i}_in", kernel_init=_init(self.init_std, ("dyn_hidden_in", None, "dyn_hidden")))(y_BxTxH)
      f_BxTxH = nn.gelu(gate_up_BxTx2xH[..., 0, :], approximate=False) * gate_up_BxTx2xH[..., 1, :]
      f_BxTxH = c(f_BxTxH, ACT_MLP)
      x_BxTxH = x_BxTxH + _dense(self, H, ("dyn_hidden", "dyn_hidden_in"), f"block_{i}_out")(f_BxTxH)
      x_BxTxH = c(x_BxTxH, ACT_EMBED)
    delta_BxTxD = _dense(self, self.d_model, ("dyn_hidden", "embed"), "fc_out")(_norm(self, "out_norm")(x_BxTxH))
    return h_BxTxD + delta_BxTxD.astype(h_BxTxD.dtype)


class GRUDynamics(_DynamicsFields):
  """A GRU-style gated update ("gru"): h_next = (1 - u) * h + u * candidate."""

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array) -> Array:
    c = Constrain(self.mesh, self.rules)
    D = self.d_model
    h32_BxTxD = h_BxTxD.astype(jnp.float32)
    z_BxTx2D = c(_norm(self, "norm")(_concat(e_BxTxD, h_BxTxD)), ACT_EMBED)
    # Gate outputs are not split over `tensor`: that layout gets wrong gradients on a (2, 2, 2) CPU mesh
    # (XLA, jax 0.10; tests/test_dynamics_kinds.py).
    gates_BxTx2xD = nn.DenseGeneral(
        (2, D), use_bias=False, dtype=DTYPES[self.dtype], param_dtype=DTYPES[self.param_dtype], name="gates",
        kernel_init=_init(self.init_std, ("dyn_in", None, None)))(z_BxTx2D)
    gates_BxTx2xD = jax.nn.sigmoid(gates_BxTx2xD.astype(jnp.float32))
    r_BxTxD, u_BxTxD = gates_BxTx2xD[..., 0, :], gates_BxTx2xD[..., 1, :]
    zc_BxTx2D = c(_norm(self, "cand_norm")(_concat(e_BxTxD, r_BxTxD * h32_BxTxD)), ACT_EMBED)
    a_BxTxH = nn.gelu(_dense(self, self.hidden, ("dyn_in", "dyn_hidden"), "fc1")(zc_BxTx2D), approximate=False)
    a_BxTxH = c(a_BxTxH, ACT_MLP)
    cand_BxTxD = _dense(self, D, ("dyn_hidden", "embed"), "fc2")(a_BxTxH).astype(jnp.float32)
    h_next_BxTxD = (1.0 - u_BxTxD) * h32_BxTxD + u_BxTxD * cand_BxTxD
    return c(h_next_BxTxD.astype(h_BxTxD.dtype), ACT_EMBED)


class AttnDynamics(_DynamicsFields):
  """Attention over the chain's last `window` predicted latents ("attn"); heads = the trunk's n_head."""
  n_heads: int = 1  # always given: model.n_head
  window: int = 4

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array, latents_BxTxKxD: Array, valid_BxTxK: Array) -> Array:
    c = Constrain(self.mesh, self.rules)
    D, N, K = self.d_model, self.n_heads, self.window
    dtype, pdtype = DTYPES[self.dtype], DTYPES[self.param_dtype]
    z_BxTx2D = c(_norm(self, "norm")(_concat(e_BxTxD, h_BxTxD)), ACT_EMBED)
    u_BxTxD = c(_dense(self, D, ("dyn_in", "dyn_out"), "fc_in")(z_BxTx2D), ACT_EMBED)
    slot_K1xD = self.param("slot", _init(self.init_std, (None, "embed")), (K + 1, D), pdtype)
    tok_BxTxK1xD = jnp.concatenate([latents_BxTxKxD.astype(dtype), u_BxTxD[..., None, :].astype(dtype)], axis=-2)
    tok_BxTxK1xD = c(tok_BxTxK1xD + slot_K1xD.astype(dtype),
                     ("activation_batch", "activation_length", None, "activation_embed"))
    y_BxTxK1xD = c(_norm(self, "attn_norm")(tok_BxTxK1xD),
                   ("activation_batch", "activation_length", None, "activation_embed"))
    y_BxTxD = c(y_BxTxK1xD[..., -1, :], ACT_EMBED)
    q_BxTxNxH = nn.DenseGeneral((N, D // N), use_bias=False, dtype=dtype, param_dtype=pdtype, name="q",
                                kernel_init=_init(self.init_std, ("embed", "heads", "kv")))(y_BxTxD)
    kv_BxTxK1x2xNxH = nn.DenseGeneral((2, N, D // N), use_bias=False, dtype=dtype, param_dtype=pdtype, name="kv",
                                      kernel_init=_init(self.init_std, ("embed", None, "heads", "kv")))(y_BxTxK1xD)
    k_BxTxK1xNxH = c(kv_BxTxK1x2xNxH[..., 0, :, :], ("activation_batch", "activation_length", None,
                                                      "activation_heads", None))
    v_BxTxK1xNxH = c(kv_BxTxK1x2xNxH[..., 1, :, :], ("activation_batch", "activation_length", None,
                                                      "activation_heads", None))
    s_BxTxNxK1 = jnp.einsum("btnh,btknh->btnk", q_BxTxNxH, k_BxTxK1xNxH,
                            preferred_element_type=jnp.float32) / math.sqrt(D // N)
    mask_BxTxK1 = jnp.concatenate([valid_BxTxK, jnp.ones(valid_BxTxK.shape[:-1] + (1,), bool)], axis=-1)
    s_BxTxNxK1 = jnp.where(mask_BxTxK1[..., None, :], s_BxTxNxK1, jnp.finfo(jnp.float32).min)
    p_BxTxNxK1 = jax.nn.softmax(s_BxTxNxK1, axis=-1).astype(dtype)
    o_BxTxNxH = jnp.einsum("btnk,btknh->btnh", p_BxTxNxK1, v_BxTxK1xNxH)
    o_BxTxNxH = c(o_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", None))
    x_BxTxD = u_BxTxD + nn.DenseGeneral(
        D, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype, name="out",
        kernel_init=_init(self.init_std, ("heads", "kv", "embed")))(o_BxTxNxH)
    x_BxTxD = c(x_BxTxD, ACT_EMBED)
    a_BxTxH = nn.gelu(_dense(self, self.hidden, ("embed", "dyn_hidden"), "fc1")(_norm(self, "mlp_norm")(x_BxTxD)),
                      approximate=False)
    x_BxTxD = c(x_BxTxD + _dense(self, D, ("dyn_hidden", "embed"), "fc2")(c(a_BxTxH, ACT_MLP)), ACT_EMBED)
    delta_BxTxD = _dense(self, D, ("dyn_out", "embed"), "fc_out")(x_BxTxD)
    return h_BxTxD + delta_BxTxD.astype(h_BxTxD.dtype)


def validate(dyn_cfg: Any) -> None:
  """config.dynamics; raises ConfigError for the first bad value."""
  need(dyn_cfg.kind in KINDS, "dynamics.kind", dyn_cfg.kind, f"unknown (known: {', '.join(KINDS)})")
  for key in ("layers", "window", "hidden"):
    need(int(dyn_cfg[key]) >= 1, f"dynamics.{key}", dyn_cfg[key], "must be >= 1")


def validate_sharding(dyn_cfg: Any, fsdp: int, tensor: int) -> None:
  """dynamics.hidden is sharded over both mesh.fsdp and mesh.tensor (its in / out matrices)."""
  H = int(dyn_cfg.hidden)
  need(H % tensor == 0 and H % fsdp == 0, "dynamics.hidden", H,
       f"must be divisible by mesh.tensor={tensor} and mesh.fsdp={fsdp}")


def make(dyn_cfg: Any, model_cfg: Any, mesh: Mesh | None = None, rules: tuple = ()) -> nn.Module:
  """The module of `dyn_cfg.kind` for a model config (d_model, dtypes, init, norm)."""
  m, kind = model_cfg, dyn_cfg.kind
  common = dict(d_model=m.d_model, hidden=dyn_cfg.hidden, norm_eps=m.norm_eps, init_std=m.init_std,
                dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules)
  if kind == "mlp":
    return Dynamics(**common)
  if kind == "resmlp":
    return ResMLPDynamics(layers=int(dyn_cfg.layers), **common)
  if kind == "gru":
    return GRUDynamics(**common)
  if kind == "attn":
    return AttnDynamics(n_heads=m.n_head, window=int(dyn_cfg.window), **common)
  raise ValueError(f"dynamics.kind={kind!r}: unknown (known: {', '.join(KINDS)})")


def is_stateful(model: Any) -> bool:
  """True for kinds whose step reads the chain carry (attn)."""
  return isinstance(model, AttnDynamics)


def init_carry(model: Any, lead_shape: tuple[int, ...]) -> Carry:
  """The carry at a chain start, for states of shape lead_shape + (D,): () for stateless kinds."""
  if not is_stateful(model):
    return ()
  K, D = model.window, model.d_model
  return {"latents": jnp.zeros(tuple(lead_shape) + (K, D), jnp.float32),
          "valid": jnp.zeros(tuple(lead_shape) + (K,), bool)}


def init_params(model: Any, rng: Array) -> Any:
  """Boxed parameters (logical axis names) of any kind."""
  z = jnp.zeros((1, 1, model.d_model))
  if not is_stateful(model):
    return model.init(rng, z, z)["params"]
  carry = init_carry(model, (1, 1))
  return model.init(rng, z, z, carry["latents"], carry["valid"])["params"]


def apply_dynamics(model: Any, dyn_params: Any, h: Array, e: Array, carry: Carry) -> tuple[Array, Carry]:
  """(p(h, e), carry with h_next appended) for states (..., D) and embeddings e = E[x_next] (..., D)."""
  if not is_stateful(model):
    return model.apply({"params": dyn_params}, h, e), carry
  h_next = model.apply({"params": dyn_params}, h, e, carry["latents"], carry["valid"])
  latents = jnp.concatenate([carry["latents"][..., 1:, :], h_next[..., None, :].astype(jnp.float32)], axis=-2)
  valid = jnp.concatenate([carry["valid"][..., 1:], jnp.ones(carry["valid"].shape[:-1] + (1,), bool)], axis=-1)
  return h_next, {"latents": latents, "valid": valid}


def advance(model: Any, dyn_params: Any, cur_BxTxD: Array, e_BxTxD: Array, carry: Carry) -> tuple[Array, Carry]:
  """One teacher-forced training-rollout step for every chain start that still has a next token:
  cur[:, t] = ĥ_{t+i-1} (length T-i+1), e = E[x][:, i:] (length T-i) -> (ĥ_{t+i} (length T-i), carry)."""
  carry = jax.tree.map(lambda a: a[:, :-1], carry)
  h_next_BxTxD, carry = apply_dynamics(model, dyn_params, cur_BxTxD[:, :-1], e_BxTxD, carry)
  return constrain_states(model, h_next_BxTxD), carry


def constrain_states(model: Any, x_BxTxD: Array) -> Array:
  """x sharded like the trunk's states (rows over the batch axes, features replicated) on the model's mesh.
  Applied to predicted latents before the head, so their cotangent (split over `fsdp` by the head's
  transposed matmul) is resharded there and not after the slice's pad (docs/sharding.md)."""
  return Constrain(model.mesh, model.rules)(x_BxTxD, ACT_EMBED)


def embed_tokens(trunk_params: Any, tokens: Array) -> Array:
  """E[x] with the trunk's input embedding table (gradients flow into it)."""
  return jnp.take(trunk_params["embed"], tokens, axis=0)


def dynamics_step(model: Any, params: Any, h: Array, x_next: Array, carry: Carry = None) -> tuple[Array, Carry]:
  """p(h, x_next) for a params tree {'trunk': ..., 'dynamics': ...}; carry None: a chain start."""
  if carry is None:
    carry = init_carry(model, h.shape[:-1])
  return apply_dynamics(model, params["dynamics"], h, embed_tokens(params["trunk"], x_next), carry)
