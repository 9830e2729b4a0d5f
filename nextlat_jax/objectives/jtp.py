"""JTP: joint multi-token prediction through the Fetch module (Ahn, Lamb & Langford 2025; spec
BASELINES.md section 4, paper Eq. 7).

Trunk: the GPT trunk (n_layer blocks + final norm) -> h_t; E shared. For every position t, Fetch builds a
planning sequence of d + 1 slots (d = objective.horizon):
  slot 0 = TC(h_t, E[x_t]),  slot k = TC(h_t, E[x_{t+k}])  (k = 1..d, teacher-forced),
  TC(h, e) = LayerNorm_with_bias(e + gamma * h), gamma a learnable scalar initialised to 0.1;
one causal self-attention layer over the slots (no MLP, no pre-norm, n_f = min(4, n_head) heads of width
D / n_f, bias-free QKV and output projections, a learned (n_f, d+1, d+1) score bias initialised to 0 and
added after the causal mask); then slot 0 -> Norm(out_0) -> head predicts x_{t+1} (no residual) and slot
k -> Norm(out_k + h_t) -> head predicts x_{t+k+1}. Norm is Fetch's own RMSNorm (not the trunk's).
Next-token inference also goes through Fetch (a one-slot attention).

Loss: CE_0 + lambda_mtp * mean_{k=1..d} CE_k, each a masked mean. Masks, as the reference:
- CE_0: the batch's loss_mask (prompt, padding);
- slot k: its target x_{t+k+1} is trained iff loss_mask[t+k+1], none of x_{t+1}..x_{t+k} is EOS (an EOS
  target itself is trained), and slot k's own input x_{t+k} is not prompt-masked (loss_mask[t+k], i.e.
  not 1 <= pos <= context_length + 1: one target position more than the next-token prompt mask);
- slot inputs k >= 1 whose token is not a trained target (loss_mask[t+k] = 0: prompt, padding, past the
  row end) are replaced by the embedding of token id 0; later slots still attend to them.

Representation (objective.representation): "trunk" (default; the reference's rank hook, h_t) or
"combine" (the paper's "state immediately before the Fetch self-attention": slot 0's TC(h_t, E[x_t])).
Drafting: `draft_logits`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextlat_jax.errors import need
from nextlat_jax.models.transformer import DTYPES, Constrain, RMSNorm, _init, unembed
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.gpt import init_trunk, trunk_module, vocab_options
from nextlat_jax.objectives.losses import Counts, denominators, mask_counts
from nextlat_jax.objectives.vocab_losses import head_cross_entropy
from nextlat_jax.objectives.mtp import eos_count, validate_aux

Array = jax.Array
REPRESENTATIONS = ("trunk", "combine")


def validate(config: Any) -> None:
  """JTP's keys; raises ConfigError for the first bad value."""
  o, m = config.objective, config.model
  validate_aux(config)
  need(o.representation in REPRESENTATIONS, "objective.representation", o.representation,
       f"must be one of {REPRESENTATIONS} for jtp")
  need(m.d_model % min(4, m.n_head) == 0, "model.d_model", m.d_model,
       f"must be divisible by jtp's min(4, n_head)={min(4, m.n_head)} Fetch heads")


def fetch_heads(n_head: int) -> int:
  return min(4, n_head)


class Fetch(nn.Module):
  """(h_BxTxD, slot embeddings e_BxTxSxD) -> per-slot states after Fetch's norm, float32 (B, T, S, D)."""
  d_model: int
  n_heads: int
  slots: int  # d + 1
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    D, N, pdtype = self.d_model, self.n_heads, DTYPES[self.param_dtype]
    self.gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.constant(0.1), ()), (), pdtype)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    self.ln_scale = self.param("combine_scale", nn.with_logical_partitioning(ones, ("norm",)), (D,), pdtype)
    self.ln_bias = self.param("combine_bias", nn.with_logical_partitioning(zeros, ("norm",)), (D,), pdtype)
    self.qkv = nn.DenseGeneral((3, N, D // N), use_bias=False, dtype=DTYPES[self.dtype], param_dtype=pdtype,
                               kernel_init=_init(self.init_std, ("embed", None, None, None)))
    self.out = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, dtype=DTYPES[self.dtype], param_dtype=pdtype,
                               kernel_init=_init(self.init_std, (None, None, "embed")))
    self.slot_bias = self.param("slot_bias", nn.with_logical_partitioning(zeros, (None, None, None)),
                                (N, self.slots, self.slots), pdtype)
    self.norm = RMSNorm(self.norm_eps, pdtype, out_dtype=jnp.float32)

  def combine(self, h_BxTxD: Array, e_BxTxSxD: Array) -> Array:
    """TeacherCombine: LayerNorm_with_bias(e + gamma * h), float32 (B, T, S, D)."""
    x = e_BxTxSxD.astype(jnp.float32) + self.gamma.astype(jnp.float32) * h_BxTxD.astype(jnp.float32)[:, :, None]
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(var + self.norm_eps)
    return y * self.ln_scale.astype(jnp.float32) + self.ln_bias.astype(jnp.float32)

  def __call__(self, h_BxTxD: Array, e_BxTxSxD: Array) -> Array:
    S, D = e_BxTxSxD.shape[2], self.d_model
    c_BxTxSxD = self.combine(h_BxTxD, e_BxTxSxD).astype(DTYPES[self.dtype])
    qkv = self.qkv(c_BxTxSxD)  # (B, T, S, 3, N, H)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    scores_BxTxNxSxS = jnp.einsum("btsnh,btrnh->btnsr", q, k, preferred_element_type=jnp.float32)
    scores_BxTxNxSxS = scores_BxTxNxSxS / jnp.sqrt(jnp.float32(D // self.n_heads))
    causal_SxS = jnp.tril(jnp.ones((S, S), bool))
    scores_BxTxNxSxS = (jnp.where(causal_SxS, scores_BxTxNxSxS, -jnp.inf)
                        + self.slot_bias[:, :S, :S].astype(jnp.float32))
    probs = jax.nn.softmax(scores_BxTxNxSxS, axis=-1).astype(v.dtype)
    o_BxTxSxNxH = jnp.einsum("btnsr,btrnh->btsnh", probs, v)
    o_BxTxSxD = self.out(o_BxTxSxNxH).astype(jnp.float32)
    residual = jnp.where(jnp.arange(S)[:, None] == 0, 0.0, 1.0) * h_BxTxD.astype(jnp.float32)[:, :, None]
    return self.norm(o_BxTxSxD + residual)


def fetch_module(config: Any) -> Fetch:
  m = config.model
  return Fetch(d_model=int(m.d_model), n_heads=fetch_heads(int(m.n_head)), slots=int(config.objective.horizon) + 1,
               norm_eps=m.norm_eps, init_std=m.init_std, dtype=m.dtype, param_dtype=m.param_dtype)


def slot_tokens(batch: dict, d: int, eos_id: int) -> tuple[Array, Array, Array]:
  """Slot inputs, targets and target masks over positions t = 0..L-2, each (B, L-1, d+1).

  inputs[..., k]: x_{t+k} (k >= 1: token id 0 where loss_mask[t+k] = 0 or t+k is past the row end);
  targets[..., k]: x_{t+k+1}; mask[..., k]: whether that target is trained (module docstring).
  """
  x_BxL, lm_BxL = batch["tokens"], batch["loss_mask"].astype(bool)
  B, L = x_BxL.shape
  T = L - 1
  x_ext = jnp.concatenate([x_BxL, jnp.zeros((B, d + 1), x_BxL.dtype)], axis=1)
  lm_ext = jnp.concatenate([lm_BxL, jnp.zeros((B, d + 1), bool)], axis=1)
  valid_BxT = batch["segment_ids"][:, :T] >= 0
  inputs, targets, masks = [x_BxL[:, :T]], [x_BxL[:, 1:]], [lm_BxL[:, 1:] & valid_BxT]
  for k in range(1, d + 1):
    inputs.append(jnp.where(lm_ext[:, k:k + T], x_ext[:, k:k + T], 0))
    targets.append(x_ext[:, k + 1:k + 1 + T])
    no_eos = eos_count(x_ext, eos_id, k, T) == 0
    masks.append(lm_ext[:, k + 1:k + 1 + T] & lm_ext[:, k:k + T] & valid_BxT & no_eos)
  return jnp.stack(inputs, -1), jnp.stack(targets, -1), jnp.stack(masks, -1)


def draft_logits(modules: dict, params: Any, h_BxD: Array, token_B: Array, drafts_BxK: Array) -> Array:
  """logits_Bx(K+1)xV (float32), K <= d, at one position t with trunk state h_BxD and input token x_t.

  Entry 0 is slot 0 (the model's next-token distribution, the verifier's); entry k is slot k fed the
  drafted tokens drafts[:, :k] (drafts[:, 0] = the token chosen from entry 0) and proposes token k + 1.
  Slots are causal, so entry k depends only on drafts[:, :k]. No trunk call.
  """
  toks_BxS = jnp.concatenate([token_B[:, None], drafts_BxK.astype(token_B.dtype)], axis=1)
  e_Bx1xSxD = jnp.take(params["trunk"]["embed"], toks_BxS, axis=0)[:, None]
  o_Bx1xSxD = modules["fetch"].apply({"params": params["fetch"]}, h_BxD[:, None], e_Bx1xSxD)
  return unembed(o_Bx1xSxD[:, 0], params["trunk"]["head"])


def build(config: Any, mesh: Any = None) -> Objective:
  trunk, fetch = trunk_module(config, mesh), fetch_module(config)
  modules = {"trunk": trunk, "fetch": fetch}
  obj = config.objective
  d, lam, eos_id = int(obj.horizon), float(obj.lambda_mtp), int(config.data.eos_id)
  representation = obj.representation
  vocab = vocab_options(config, trunk)
  constrain = Constrain(trunk.mesh, trunk.rules)

  def init(rng: jax.Array) -> Any:
    r_trunk, r_fetch = jax.random.split(rng)
    D = trunk.cfg.d_model
    return {"trunk": init_trunk(trunk, r_trunk),
            "fetch": fetch.init(r_fetch, jnp.zeros((1, 1, D)), jnp.zeros((1, 1, d + 1, D)))["params"]}

  def hidden(params: Any, batch: dict) -> Array:
    h_BxLxD, e_BxLxD = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                                   batch["positions"])
    if representation == "trunk":
      return h_BxLxD
    c = fetch.apply({"params": params["fetch"]}, h_BxLxD, e_BxLxD[:, :, None], method=Fetch.combine)
    return c[:, :, 0]

  def slot_loss(head_DxV, o_BxTxD, targets_BxT, mask_BxT, count=None):
    return head_cross_entropy(o_BxTxD, head_DxV, targets_BxT, mask_BxT, count, **vocab)

  if obj.remat_rollout:
    slot_loss = jax.checkpoint(slot_loss)

  def term_counts(batch: dict) -> Counts:
    masks_BxTxS = slot_tokens(batch, d, eos_id)[2]
    return mask_counts({f"ce_{k}": masks_BxTxS[..., k] for k in range(d + 1)})

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    del rng
    denom = denominators(counts)
    x_BxL = batch["tokens"]
    h_BxTxD, _ = trunk.apply({"params": params["trunk"]}, x_BxL[:, :-1], batch["segment_ids"][:, :-1],
                             batch["positions"][:, :-1])
    inputs_BxTxS, targets_BxTxS, masks_BxTxS = slot_tokens(batch, d, eos_id)
    e_BxTxSxD = jnp.take(constrain(params["trunk"]["embed"], (None, None)), inputs_BxTxS, axis=0)
    e_BxTxSxD = constrain(e_BxTxSxD, ("activation_batch", "activation_length", None, "activation_embed"))
    o_BxTxSxD = fetch.apply({"params": params["fetch"]}, h_BxTxD, e_BxTxSxD)
    head_DxV = params["trunk"]["head"]
    metrics, aux = {}, 0.0
    for k in range(d + 1):
      ce_k = slot_loss(head_DxV, o_BxTxSxD[:, :, k], targets_BxTxS[..., k], masks_BxTxS[..., k], denom(f"ce_{k}"))
      metrics[f"ce_{k}"] = ce_k
      aux = aux + ce_k if k else aux
    total = metrics["ce_0"] + lam * aux / d
    metrics.update(loss=total, ce=metrics["ce_0"], mtp=aux / d)
    return total, metrics

  return Objective("jtp", init, loss, hidden, modules, term_counts)
