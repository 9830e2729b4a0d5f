"""The latent dynamics model p_psi(h_t, x_{t+1}) -> h_{t+1} (spec METHOD.md section 4).

z = RMSNorm_2D(concat[E(x_{t+1}), h_t]) (embedding first, E is the trunk's own table);
h_next = h_t + Linear(H->D)(GELU(Linear(H->H)(GELU(Linear(2D->H)(z))))), exact-erf GELU, no biases.
Training rollouts, the A5 RNN mode and speculative drafting all go through `dynamics_step`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nextlat_jax.models.transformer import DTYPES, Constrain, RMSNorm, _init

Array = jax.Array


class Dynamics(nn.Module):
  d_model: int
  hidden: int
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  mesh: Mesh | None = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array) -> Array:
    c = Constrain(self.mesh, self.rules)
    dtype, pdtype = DTYPES[self.dtype], DTYPES[self.param_dtype]
    z_BxTx2D = jnp.concatenate([e_BxTxD.astype(jnp.float32), h_BxTxD.astype(jnp.float32)], axis=-1)
    z_BxTx2D = RMSNorm(self.norm_eps, pdtype, axis_name="dyn_norm", out_dtype=dtype, name="norm")(z_BxTx2D)

    def dense(features: int, names: tuple[str, str], name: str):
      return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                      kernel_init=_init(self.init_std, names))

    a_BxTxH = nn.gelu(dense(self.hidden, ("dyn_in", "dyn_hidden"), "fc1")(z_BxTx2D), approximate=False)
    a_BxTxH = c(a_BxTxH, ("activation_batch", "activation_length", "activation_mlp"))
    a_BxTxH = nn.gelu(dense(self.hidden, ("dyn_hidden_in", "dyn_hidden"), "fc2")(a_BxTxH), approximate=False)
    a_BxTxH = c(a_BxTxH, ("activation_batch", "activation_length", "activation_mlp"))
    delta_BxTxD = dense(self.d_model, ("dyn_hidden", "embed"), "fc3")(a_BxTxH)
    return h_BxTxD + delta_BxTxD.astype(h_BxTxD.dtype)


def embed_tokens(trunk_params: Any, tokens: Array) -> Array:
  """E[x] with the trunk's input embedding table (gradients flow into it)."""
  return jnp.take(trunk_params["embed"], tokens, axis=0)


def dynamics_step(model: Dynamics, params: Any, h: Array, x_next: Array) -> Array:
  """p_psi(h, x_next) for a params tree {'trunk': ..., 'dynamics': ...}."""
  e = embed_tokens(params["trunk"], x_next)
  return model.apply({"params": params["dynamics"]}, h, e)
