"""MTP: multi-token prediction with parallel heads (Gloeckle et al. 2024), as built for the paper
(spec BASELINES.md section 2).

Architecture: a trunk of n_layer - 1 blocks with no final norm (embedding and output head as GPT's),
then d + 1 parallel heads, each one transformer block + its own final RMSNorm, sharing the output head.
Head 0 predicts x_{t+1}; head i predicts x_{t+1+i} from position t. Inference uses head 0 only, so the
deployed model has n_layer blocks, like GPT. d = objective.horizon.

Loss: CE_0 + lambda_mtp * (1/d) sum_{i=1..d} CE_i, each a masked mean. Targets: head 0 uses the batch's
loss_mask (prompt, padding); head i >= 1 also needs its target unmasked (loss_mask) and its input
non-padding, plus a document rule (objective.mtp_eos_mask):
- "reference" (default): keep x_{t+1+i} iff #EOS among x_{t+1}..x_{t+i} == 1[x_{t+1+i} is EOS]
  (what the reference code does: an EOS target with no EOS before it in the window is dropped, one
  preceded by exactly one EOS is kept);
- "intended": keep iff none of x_{t+1}..x_{t+i} is EOS (an EOS target itself is trained).

Representation for rank / probe metrics (objective.representation): "trunk" (default, the reference's
hook: the shared-trunk output before the heads, un-normalised) or "head0" (the next-token head's
output, post its norm). `representations` returns both.

Drafting: `draft_logits` gives the d + 1 head distributions at the last position (head i -> token i+1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextlat_jax.errors import need
from nextlat_jax.models.transformer import (DTYPES, Block, ModelConfig, RMSNorm, Stack, _remat_policy, document_mask,
                                            embed_with_head, unembed)
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.gpt import vocab_options
from nextlat_jax.objectives.losses import Counts, denominators, mask_counts
from nextlat_jax.objectives.vocab_losses import head_cross_entropy
from nextlat_jax.parallel.sharding import logical_rules

Array = jax.Array
EOS_MASKS = ("reference", "intended")
REPRESENTATIONS = ("trunk", "head0")


def validate_aux(config: Any) -> None:
  """objective.horizon and objective.lambda_mtp, as mtp, jtp and mtp_deepseek read them."""
  o = config.objective
  need(int(o.horizon) >= 1, "objective.horizon", o.horizon, f"must be >= 1 for {o.name}")
  need(float(o.lambda_mtp) >= 0, "objective.lambda_mtp", o.lambda_mtp, "must be >= 0")


def validate(config: Any) -> None:
  """MTP's keys; raises ConfigError for the first bad value."""
  o, m = config.objective, config.model
  validate_aux(config)
  need(int(m.n_layer) >= 2, "model.n_layer", m.n_layer, "must be >= 2 for mtp (trunk of n_layer - 1 blocks)")
  need(o.mtp_eos_mask in EOS_MASKS, "objective.mtp_eos_mask", o.mtp_eos_mask, "must be 'reference' or 'intended'")
  need(o.representation in REPRESENTATIONS, "objective.representation", o.representation,
       f"must be one of {REPRESENTATIONS} for mtp")


def eos_count(tokens_BxL: Array, eos_id: int, i: int, n: int) -> Array:
  """(B, n) int32: the number of EOS among x_{t+1}..x_{t+i}, for t = 0..n-1 (needs n + i <= L)."""
  c_BxL = jnp.cumsum((tokens_BxL == eos_id).astype(jnp.int32), axis=1)
  return c_BxL[:, i:i + n] - c_BxL[:, :n]


class MTPTrunk(nn.Module):
  """tokens, segment_ids, positions (B, T) -> (z_BxTxD: n_layer - 1 blocks, no final norm; e = E[x])."""
  cfg: ModelConfig
  mesh: Any = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, tokens_BxT: Array, segment_ids_BxT: Array, positions_BxT: Array):
    cfg = self.cfg
    e_BxTxD = embed_with_head(self, tokens_BxT)
    stack_cfg = dataclasses.replace(cfg, n_layer=cfg.n_layer - 1)
    z_BxTxD = Stack(stack_cfg, self.mesh, self.rules, final_norm=False, name="stack")(
        e_BxTxD, segment_ids_BxT, positions_BxT)
    return z_BxTxD, e_BxTxD


class MTPHead(nn.Module):
  """One output head: a transformer block and its own final RMSNorm; returns float32 (B, T, D)."""
  cfg: ModelConfig
  mesh: Any = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, z_BxTxD: Array, mask_Bx1xTxT: Array, positions_BxT: Array) -> Array:
    cfg = self.cfg
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=True)
    x_BxTxD, _ = block(cfg, self.mesh, self.rules, name="block")(z_BxTxD, mask_Bx1xTxT, positions_BxT)
    return RMSNorm(cfg.norm_eps, DTYPES[cfg.param_dtype], name="norm", out_dtype=jnp.float32)(x_BxTxD)


class MTPHeads(nn.Module):
  """n_heads parallel heads `head_0` .. `head_{n-1}` on the trunk output."""
  cfg: ModelConfig
  n_heads: int
  mesh: Any = None
  rules: tuple = ()

  def setup(self):
    self.head = [MTPHead(self.cfg, self.mesh, self.rules) for _ in range(self.n_heads)]

  def __call__(self, z_BxTxD: Array, segment_ids_BxT: Array, positions_BxT: Array) -> list[Array]:
    mask = document_mask(segment_ids_BxT)
    return [h(z_BxTxD, mask, positions_BxT) for h in self.head]

  def one(self, z_BxTxD: Array, segment_ids_BxT: Array, positions_BxT: Array, i: int) -> Array:
    return self.head[i](z_BxTxD, document_mask(segment_ids_BxT), positions_BxT)


def modules_for(config: Any, mesh: Any = None) -> dict[str, nn.Module]:
  cfg = ModelConfig.from_config(config.model)
  rules = logical_rules(config) if mesh is not None else ()
  return {"trunk": MTPTrunk(cfg, mesh, rules),
          "heads": MTPHeads(cfg, int(config.objective.horizon) + 1, mesh, rules)}


def target_mask(batch: dict, i: int, eos_id: int, eos_mask: str = "reference") -> Array:
  """(B, L-1-i) bool: whether head i's target x_{t+1+i} at position t is trained."""
  x_BxL, L = batch["tokens"], batch["tokens"].shape[1]
  n = L - 1 - i
  m = batch["loss_mask"][:, 1 + i:].astype(bool) & (batch["segment_ids"][:, :n] >= 0)
  if i == 0:
    return m
  crossed = eos_count(x_BxL, eos_id, i, n)
  if eos_mask == "reference":
    return m & (crossed == (x_BxL[:, 1 + i:] == eos_id).astype(jnp.int32))
  return m & (crossed == 0)


def representations(modules: dict, params: Any, batch: dict) -> dict[str, Array]:
  """{"trunk": z (un-normalised trunk output), "head0": head 0's output}, both (B, L, D) on the full row."""
  args = (batch["tokens"], batch["segment_ids"], batch["positions"])
  z_BxLxD, _ = modules["trunk"].apply({"params": params["trunk"]}, *args)
  h0_BxLxD = modules["heads"].apply({"params": params["heads"]}, z_BxLxD, *args[1:], 0, method=MTPHeads.one)
  return {"trunk": z_BxLxD.astype(jnp.float32), "head0": h0_BxLxD}


def draft_logits(modules: dict, params: Any, z_BxTxD: Array, segment_ids_BxT: Array,
                 positions_BxT: Array) -> Array:
  """logits_BxGxV (float32, G = d + 1) at the last position T - 1: entry i is head i's distribution for
  token i + 1 after the prefix (entry 0 is the model's own next-token distribution; the verifier's).

  z_BxTxD is the trunk output (`modules["trunk"].apply(...)[0]`) over the prefix, aligned so that
  column T - 1 is the last real token. Each head is a block that attends over all prefix positions.
  """
  hs = modules["heads"].apply({"params": params["heads"]}, z_BxTxD, segment_ids_BxT, positions_BxT)
  h_BxGxD = jnp.stack([h[:, -1] for h in hs], axis=1)
  return unembed(h_BxGxD, params["trunk"]["head"])


def build(config: Any, mesh: Any = None) -> Objective:
  modules = modules_for(config, mesh)
  trunk, heads = modules["trunk"], modules["heads"]
  obj = config.objective
  d, lam = int(obj.horizon), float(obj.lambda_mtp)
  eos_mask, eos_id = obj.mtp_eos_mask, int(config.data.eos_id)
  representation = obj.representation
  vocab = vocab_options(config, trunk)

  def init(rng: jax.Array) -> Any:
    r_trunk, r_heads = jax.random.split(rng)
    x = jnp.zeros((1, 2), jnp.int32)
    p_trunk = trunk.init(r_trunk, x, x, x)["params"]
    z = jnp.zeros((1, 2, trunk.cfg.d_model), DTYPES[trunk.cfg.dtype])
    return {"trunk": p_trunk, "heads": heads.init(r_heads, z, x, x)["params"]}

  def hidden(params: Any, batch: dict) -> Array:
    if representation == "head0":
      return representations(modules, params, batch)["head0"]
    z_BxLxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                             batch["positions"])
    return z_BxLxD.astype(jnp.float32)

  def head_loss(heads_params, head_DxV, z_BxTxD, seg_BxT, pos_BxT, targets_BxN, mask_BxN, i, count=None):
    h_BxTxD = heads.apply({"params": heads_params}, z_BxTxD, seg_BxT, pos_BxT, i, method=MTPHeads.one)
    return head_cross_entropy(h_BxTxD[:, :targets_BxN.shape[1]], head_DxV, targets_BxN, mask_BxN, count, **vocab)

  if obj.remat_rollout:
    head_loss = jax.checkpoint(head_loss, static_argnums=(7,))

  def term_counts(batch: dict) -> Counts:
    return mask_counts({f"ce_{i}": target_mask(batch, i, eos_id, eos_mask) for i in range(d + 1)})

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    del rng
    denom = denominators(counts)
    x_BxL = batch["tokens"]
    seg_BxT, pos_BxT = batch["segment_ids"][:, :-1], batch["positions"][:, :-1]
    z_BxTxD, _ = trunk.apply({"params": params["trunk"]}, x_BxL[:, :-1], seg_BxT, pos_BxT)
    head_DxV = params["trunk"]["head"]
    metrics, aux = {}, 0.0
    for i in range(d + 1):
      ce_i = head_loss(params["heads"], head_DxV, z_BxTxD, seg_BxT, pos_BxT, x_BxL[:, 1 + i:],
                       target_mask(batch, i, eos_id, eos_mask), i, denom(f"ce_{i}"))
      metrics[f"ce_{i}"] = ce_i
      aux = aux + ce_i if i else aux
    total = metrics["ce_0"] + lam * aux / d
    metrics.update(loss=total, ce=metrics["ce_0"], mtp=aux / d)
    return total, metrics

  return Objective("mtp", init, loss, hidden, modules, term_counts)
