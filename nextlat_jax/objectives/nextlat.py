"""NextLat: next-token CE + lambda_next_h * SmoothL1 next-latent loss + lambda_kl * KL self-distillation,
rolled out `horizon` steps with teacher-forced tokens (spec METHOD.md sections 5, 6, 12).

With the default switches, stop-gradients sit in exactly three places: the Smooth L1 target h_{t+i}, the
KL teacher logits and the head weight inside the KL student logits. Ablation switches (config.objective,
paper's choice first; docs/research.md): `next_h_stop_gradient` (True | False: the next-h target also
trains the trunk), `kl_frozen_head` (True | False: the token-space term also trains the head),
`token_loss` ("kl" | "ce": cross entropy of head(ĥ_{t+i}) against x_{t+i+1}, metric `latent_ce` |
"none"), `next_h_loss` ("smooth_l1" | "mse" | "cosine"), `eos_mask` ("transition" | "chain"); the
dynamics model is `config.dynamics` (kind, hidden, ...; nextlat_jax.models.dynamics).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nextlat_jax.errors import need
from nextlat_jax.models import dynamics as dynamics_lib
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.gpt import init_trunk, trunk_module, vocab_options
from nextlat_jax.objectives.losses import (NEXT_H_LOSSES, Counts, denominator, denominators, mask_counts,
                                           next_latent_loss)
from nextlat_jax.objectives.vocab_losses import head_losses
from nextlat_jax.parallel.sharding import logical_rules

EOS_MASKS = ("transition", "chain")
TOKEN_LOSSES = ("kl", "ce", "none")


def validate(config: Any) -> None:
  """config.objective's NextLat keys and config.dynamics; raises ConfigError for the first bad value."""
  o = config.objective
  need(int(o.horizon) >= 1, "objective.horizon", o.horizon, "must be >= 1 for nextlat")
  need(o.eos_mask in EOS_MASKS, "objective.eos_mask", o.eos_mask, "must be 'transition' or 'chain'")
  dynamics_lib.validate(config.dynamics)
  for key in ("next_h_stop_gradient", "kl_frozen_head"):
    need(isinstance(o[key], bool), f"objective.{key}", o[key], "must be True or False")
  need(o.token_loss in TOKEN_LOSSES, "objective.token_loss", o.token_loss, "must be 'kl', 'ce' or 'none'")
  need(o.next_h_loss in NEXT_H_LOSSES, "objective.next_h_loss", o.next_h_loss,
       "must be 'smooth_l1', 'mse' or 'cosine'")
  for key in ("lambda_next_h", "lambda_kl"):
    need(float(o[key]) >= 0, f"objective.{key}", o[key], "must be >= 0")


def validate_sharding(config: Any, fsdp: int, tensor: int) -> None:
  """The dynamics model's widths on the mesh."""
  dynamics_lib.validate_sharding(config.dynamics, fsdp, tensor)


def dynamics_module(config: Any, mesh: Any = None) -> Any:
  """The p_psi module of config.dynamics.kind (nextlat_jax.models.dynamics.make)."""
  return dynamics_lib.make(config.dynamics, config.model, mesh,
                           logical_rules(config) if mesh is not None else ())


def term_masks(batch: dict, horizon: int, eos_id: int, eos_mask: str, token_key: str | None) -> dict[str, jax.Array]:
  """The loss's masks by term (bool): "ce" (B, T-1) over next-token targets; for i = 1..horizon,
  f"next_h_{i}" (B, T-i) over chain starts t whose target h_{t+i} is trained and, unless token_key is
  None, f"{token_key}_{i}" (B, T-i-1) over those whose token-space target x_{t+i+1} also is."""
  x_BxT = batch["tokens"]
  m_tok_BxT = batch["loss_mask"][:, 1:].astype(bool)
  valid_BxT = batch["segment_ids"] >= 0
  masks, m_chain_BxT = {"ce": m_tok_BxT}, valid_BxT
  for i in range(1, horizon + 1):
    m_h_BxT = valid_BxT[:, i:] & (x_BxT[:, i:] != eos_id)
    if eos_mask == "chain":
      m_chain_BxT = m_chain_BxT[:, :-1] & m_h_BxT
      m_h_BxT = m_chain_BxT
    masks[f"next_h_{i}"] = m_h_BxT
    if token_key:
      masks[f"{token_key}_{i}"] = m_h_BxT[:, :-1] & m_tok_BxT[:, i:]
  return masks


def build(config: Any, mesh: Any = None) -> Objective:
  trunk, dyn = trunk_module(config, mesh), dynamics_module(config, mesh)
  obj = config.objective
  horizon, lam_h, lam_kl = int(obj.horizon), float(obj.lambda_next_h), float(obj.lambda_kl)
  eos_mask, eos_id = obj.eos_mask, int(config.data.eos_id)
  stop_target, frozen_head = bool(obj.next_h_stop_gradient), bool(obj.kl_frozen_head)
  token_loss, next_h_kind = obj.token_loss, obj.next_h_loss
  token_key = {"kl": "kl", "ce": "latent_ce", "none": None}[token_loss]
  vocab = vocab_options(config, trunk)
  sg = jax.lax.stop_gradient

  def init(rng: jax.Array) -> Any:
    r_trunk, r_dyn = jax.random.split(rng)
    return {"trunk": init_trunk(trunk, r_trunk), "dynamics": dynamics_lib.init_params(dyn, r_dyn)}

  def hidden(params: Any, batch: dict) -> jax.Array:
    h_BxTxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                             batch["positions"])
    return h_BxTxD

  def rollout_step(dyn_params, cur_BxTxD, carry, e_BxTxD, h_tgt_BxTxD, m_h_BxT, n_h=None):
    """One p_psi step over every chain start: the new predictions and carry and this step's next_h
    loss (n_h: its denominator; None: the mask's count)."""
    cur_BxTxD, carry = dynamics_lib.advance(dyn, dyn_params, cur_BxTxD, e_BxTxD, carry)
    target_BxTxD = sg(h_tgt_BxTxD) if stop_target else h_tgt_BxTxD
    return cur_BxTxD, carry, next_latent_loss(next_h_kind, cur_BxTxD, target_BxTxD, m_h_BxT, n_h)

  if obj.remat_rollout:
    rollout_step = jax.checkpoint(rollout_step)

  def term_counts(batch: dict) -> Counts:
    return mask_counts(term_masks(batch, horizon, eos_id, eos_mask, token_key))

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    del rng
    denom, masks = denominators(counts), term_masks(batch, horizon, eos_id, eos_mask, token_key)
    x_BxT = batch["tokens"]
    h_BxTxD, e_BxTxD = trunk.apply({"params": params["trunk"]}, x_BxT, batch["segment_ids"],
                                   batch["positions"])
    metrics, total_h = {}, 0.0
    cur_BxTxD, students, student_masks = h_BxTxD, [], []
    carry = dynamics_lib.init_carry(dyn, h_BxTxD.shape[:-1])
    for i in range(1, horizon + 1):
      # cur[:, t] = ĥ_{t+i}, predicted from chain start t; lengths shrink by one per step.
      cur_BxTxD, carry, next_h = rollout_step(params["dynamics"], cur_BxTxD, carry, e_BxTxD[:, i:],
                                              h_BxTxD[:, i:], masks[f"next_h_{i}"], denom(f"next_h_{i}"))
      metrics[f"next_h_{i}"] = next_h
      total_h = total_h + next_h
      if token_key:  # head(ĥ_{t+i}) is scored at position t + i: shifted right by i, as the teacher's
        students.append(jnp.pad(dynamics_lib.constrain_states(dyn, cur_BxTxD[:, :-1]), ((0, 0), (i, 0), (0, 0))))
        student_masks.append(jnp.pad(masks[f"{token_key}_{i}"], ((0, 0), (i, 0))))

    # Position t predicts x_{t+1} (the CE) and is the teacher of every student scored there.
    targets_BxT = batch.get("labels", x_BxT)[:, 1:]  # task labels (A5) or the next tokens
    ce_sum, tok_sums = head_losses(
        h_BxTxD[:, :-1], params["trunk"]["head"], targets_BxT, masks["ce"],
        jnp.stack(students) if students else None, jnp.stack(student_masks) if students else None,
        token_loss=token_loss if token_key else "kl", train_student_head=not frozen_head, **vocab)
    ce = ce_sum / denominator(denom("ce"), masks["ce"])
    total_tok = 0.0
    for i in range(1, horizon + 1) if token_key else ():
      key = f"{token_key}_{i}"
      metrics[key] = tok_sums[i - 1] / denominator(denom(key), masks[key])
      total_tok = total_tok + metrics[key]
    next_h, tok = total_h / horizon, total_tok / horizon
    total = ce + lam_h * next_h + lam_kl * tok
    metrics.update(loss=total, ce=ce, next_h=next_h)
    if token_key:
      metrics[token_key] = tok
    return total, metrics

  return Objective("nextlat", init, loss, hidden, {"trunk": trunk, "dynamics": dyn}, term_counts)
