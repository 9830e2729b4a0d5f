"""NextLat: next-token CE + lambda_next_h * SmoothL1 next-latent loss + lambda_kl * KL self-distillation,
rolled out `horizon` steps with teacher-forced tokens (spec METHOD.md sections 5, 6, 12).

Stop-gradients sit in exactly three places: the Smooth L1 target h_{t+i}, the KL teacher logits and the
head weight inside the KL student logits.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nextlat_jax.models.dynamics import Dynamics, embed_tokens
from nextlat_jax.models.transformer import DTYPES, unembed
from nextlat_jax.objectives import Objective
from nextlat_jax.objectives.gpt import init_trunk, trunk_module
from nextlat_jax.objectives.losses import forward_kl, masked_mean, smooth_l1, token_cross_entropy
from nextlat_jax.parallel.sharding import logical_rules

EOS_MASKS = ("transition", "chain")


def dynamics_module(config: Any, mesh: Any = None) -> Dynamics:
  m = config.model
  return Dynamics(d_model=m.d_model, hidden=config.dynamics.hidden, norm_eps=m.norm_eps,
                  init_std=m.init_std, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                  rules=logical_rules(config) if mesh is not None else ())


def build(config: Any, mesh: Any = None) -> Objective:
  trunk, dyn = trunk_module(config, mesh), dynamics_module(config, mesh)
  obj = config.objective
  horizon, lam_h, lam_kl = int(obj.horizon), float(obj.lambda_next_h), float(obj.lambda_kl)
  eos_mask, eos_id = obj.get("eos_mask", "transition"), int(config.data.eos_id)
  dtype = DTYPES[trunk.cfg.dtype]

  def init(rng: jax.Array) -> Any:
    r_trunk, r_dyn = jax.random.split(rng)
    D = trunk.cfg.d_model
    return {"trunk": init_trunk(trunk, r_trunk),
            "dynamics": dyn.init(r_dyn, jnp.zeros((1, 1, D)), jnp.zeros((1, 1, D)))["params"]}

  def hidden(params: Any, batch: dict) -> jax.Array:
    h_BxTxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                             batch["positions"])
    return h_BxTxD

  def rollout_step(dyn_params, head_DxV, cur_BxTxD, e_BxTxD, h_tgt_BxTxD, teacher_BxTxV, m_h_BxT, m_kl_BxT):
    """One p_psi step: returns the new prediction and this step's (next_h, kl) losses."""
    cur_BxTxD = dyn.apply({"params": dyn_params}, cur_BxTxD, e_BxTxD)
    err_BxT = jnp.sum(smooth_l1(cur_BxTxD, jax.lax.stop_gradient(h_tgt_BxTxD)), axis=-1)
    next_h = masked_mean(err_BxT, m_h_BxT) / cur_BxTxD.shape[-1]
    student_BxTxV = unembed(cur_BxTxD[:, :-1], jax.lax.stop_gradient(head_DxV), dtype)
    kl = masked_mean(forward_kl(teacher_BxTxV, student_BxTxV), m_kl_BxT)
    return cur_BxTxD, next_h, kl

  if obj.get("remat_rollout", False):
    rollout_step = jax.checkpoint(rollout_step)

  def loss(params: Any, batch: dict, rng: jax.Array):
    del rng
    x_BxT = batch["tokens"]
    h_BxTxD, e_BxTxD = trunk.apply({"params": params["trunk"]}, x_BxT, batch["segment_ids"],
                                   batch["positions"])
    head_DxV = params["trunk"]["head"]
    logits_BxTxV = unembed(h_BxTxD[:, :-1], head_DxV, dtype)  # position t predicts x_{t+1}
    m_tok_BxT = batch["loss_mask"][:, 1:].astype(bool)
    targets_BxT = batch.get("labels", x_BxT)[:, 1:]  # task labels (A5) or the next tokens
    ce = masked_mean(token_cross_entropy(logits_BxTxV, targets_BxT), m_tok_BxT)
    teacher_BxTxV = jax.lax.stop_gradient(logits_BxTxV)
    valid_BxT = batch["segment_ids"] >= 0

    metrics, total_h, total_kl = {}, 0.0, 0.0
    cur_BxTxD, m_chain_BxT = h_BxTxD, valid_BxT
    for i in range(1, horizon + 1):
      # cur[:, t] = ĥ_{t+i}, predicted from chain start t; lengths shrink by one per step.
      m_h_BxT = valid_BxT[:, i:] & (x_BxT[:, i:] != eos_id)
      if eos_mask == "chain":
        m_chain_BxT = m_chain_BxT[:, :-1] & m_h_BxT
        m_h_BxT = m_chain_BxT
      m_kl_BxT = m_h_BxT[:, :-1] & m_tok_BxT[:, i:]
      cur_BxTxD, next_h, kl = rollout_step(params["dynamics"], head_DxV, cur_BxTxD[:, :-1],
                                           e_BxTxD[:, i:], h_BxTxD[:, i:], teacher_BxTxV[:, i:],
                                           m_h_BxT, m_kl_BxT)
      metrics[f"next_h_{i}"], metrics[f"kl_{i}"] = next_h, kl
      total_h, total_kl = total_h + next_h, total_kl + kl
    next_h, kl = total_h / horizon, total_kl / horizon
    total = ce + lam_h * next_h + lam_kl * kl
    metrics.update(loss=total, ce=ce, next_h=next_h, kl=kl)
    return total, metrics

  return Objective("nextlat", init, loss, hidden, {"trunk": trunk, "dynamics": dyn})
