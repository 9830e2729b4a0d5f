"""BST: the Belief State Transformer (Hu et al. 2025; spec BASELINES.md section 5, paper Eq. 6).

Encoders: one shared embedding (the forward trunk's E); a forward stack f (the GPT trunk: n_layer blocks
+ final norm, causal within documents) and an independent backward stack b (n_layer blocks + final norm,
anti-causal within documents, where an EOS belongs to the PRECEDING document, and RoPE positions
counted from the right). The backward stack runs on the reversed row, where its mask is the ordinary
block-diagonal causal one.

Text head on a pair (prefix end s, suffix start u), s < u in one document:
  z = [f_s ; b_u] (2D);  z <- z + SwiGLU(2D -> H' -> 2D), H' = 128 round(8/3 2D / 128);  z <- RMSNorm_2D(z)
  (z_next, z_prev) = split(z); both go through the shared output head.
Targets: next = x_{s+1}, prev = x_{u-1} for a gap k = u - s >= 2; both EOS for k = 1. An empty prefix is
the forward state of the document's opening EOS; an empty suffix the backward state of its closing EOS.

Pairs: every (s, u) with s < u, k in [bst_min_gap, bst_max_gap) (bst_max_gap = -1: no limit), no EOS
strictly between them, both non-padding, and the prefix past the prompt: loss_mask[s+1] = 1, i.e. the
token after the prefix is a trained next-token target (pos[s] >= context_length + 1; our reading of the
spec's t >= context_length with this project's prompt mask). With objective.bst_pair_fraction < 1, each
row keeps a fixed budget of ceil(fraction x candidate pairs) pairs (JAX needs a static count): first the
valid pairs that touch an EOS (prefix end or suffix start is an EOS), then valid pairs uniformly at
random (drawn from the `rng` argument of loss). The reference instead keeps an expected count of
rate x a running mean of valid pairs; we have no running state.

Loss: (CE_next + CE_prev) / 2 per pair; objective.bst_normalize = "row" (default: mean over a row's
pairs, then the sum over rows / B; the reference's mean of per-chunk means when a row fits one chunk) or
"pair" (mean over all pairs of the batch); both are exact under gradient accumulation (`counts`: rows
and pairs), though with bst_pair_fraction < 1 each microbatch draws its own pairs. Pairs are processed in
chunks of objective.bst_pair_chunk per row under lax.scan with jax.checkpoint, so memory is
O(B x chunk x (D + H' + V)).

hidden(): the forward encoder's output. Generation: `next_token_logits` (forward state + the backward
state of a lone EOS).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nextlat_jax.errors import need
from nextlat_jax.models.transformer import DTYPES, ModelConfig, RMSNorm, Stack, _init, ffn_width, unembed
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.gpt import init_trunk, trunk_module
from nextlat_jax.objectives.losses import Counts, token_cross_entropy
from nextlat_jax.parallel.sharding import logical_rules

Array = jax.Array
NORMALIZE = ("row", "pair")


def validate(config: Any) -> None:
  """BST's keys; raises ConfigError for the first bad value."""
  o = config.objective
  need(int(o.bst_min_gap) >= 1, "objective.bst_min_gap", o.bst_min_gap, "must be >= 1")
  need(int(o.bst_max_gap) == -1 or int(o.bst_max_gap) > int(o.bst_min_gap), "objective.bst_max_gap",
       o.bst_max_gap, f"must be -1 (no limit) or > bst_min_gap={o.bst_min_gap}")
  need(0 < float(o.bst_pair_fraction) <= 1, "objective.bst_pair_fraction", o.bst_pair_fraction,
       "must be in (0, 1]")
  need(int(o.bst_pair_chunk) >= 1, "objective.bst_pair_chunk", o.bst_pair_chunk, "must be >= 1")
  need(o.bst_normalize in NORMALIZE, "objective.bst_normalize", o.bst_normalize, "must be 'row' or 'pair'")


class TextHead(nn.Module):
  """(f_NxD, b_NxD) -> (z_next, z_prev), float32 (..., D) each."""
  d_model: int
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, f: Array, b: Array) -> tuple[Array, Array]:
    D2, H = 2 * self.d_model, ffn_width(2 * self.d_model)
    dtype, pdtype = DTYPES[self.dtype], DTYPES[self.param_dtype]
    z = jnp.concatenate([f.astype(jnp.float32), b.astype(jnp.float32)], axis=-1)
    gate_up = nn.DenseGeneral((2, H), use_bias=False, dtype=dtype, param_dtype=pdtype, name="mlp_in",
                              kernel_init=_init(self.init_std, ("embed", None, "mlp")))(z.astype(dtype))
    a = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    z = z + nn.Dense(D2, use_bias=False, dtype=dtype, param_dtype=pdtype, name="mlp_out",
                     kernel_init=_init(self.init_std, ("mlp", "embed")))(a).astype(jnp.float32)
    z = RMSNorm(self.norm_eps, pdtype, name="norm", out_dtype=jnp.float32)(z)
    return z[..., :self.d_model], z[..., self.d_model:]


def modules_for(config: Any, mesh: Any = None) -> dict[str, nn.Module]:
  m = config.model
  rules = logical_rules(config) if mesh is not None else ()
  return {"trunk": trunk_module(config, mesh),
          "backward": Stack(ModelConfig.from_config(m), mesh, rules),
          "text_head": TextHead(int(m.d_model), m.norm_eps, m.init_std, m.dtype, m.param_dtype)}


def backward_inputs(tokens_BxL: Array, segment_ids_BxL: Array, eos_id: int) -> tuple[Array, Array]:
  """Backward-encoder document ids (EOS joins the preceding document; padding -1) and positions counted
  from the right (the closing EOS has 0, the tokens before it 1, 2, ...; virtual EOS after the row)."""
  L = tokens_BxL.shape[1]
  is_eos = tokens_BxL == eos_id
  seg = jnp.where(segment_ids_BxL >= 0, segment_ids_BxL - is_eos.astype(segment_ids_BxL.dtype), -1)
  t_L = jnp.arange(L)
  next_eos = jax.lax.cummin(jnp.where(is_eos, t_L, L), axis=1, reverse=True)
  pos = jnp.where(segment_ids_BxL >= 0, next_eos - t_L, 0)
  return seg.astype(jnp.int32), pos.astype(jnp.int32)


def encode(modules: dict, params: Any, batch: dict, eos_id: int) -> tuple[Array, Array]:
  """(f_BxLxD, b_BxLxD): forward and backward encoder states over the whole row."""
  x_BxL, seg_BxL = batch["tokens"], batch["segment_ids"]
  f_BxLxD, e_BxLxD = modules["trunk"].apply({"params": params["trunk"]}, x_BxL, seg_BxL, batch["positions"])
  bseg_BxL, bpos_BxL = backward_inputs(x_BxL, seg_BxL, eos_id)
  rev = lambda a: jnp.flip(a, axis=1)
  b_rev = modules["backward"].apply({"params": params["backward"]}, rev(e_BxLxD), rev(bseg_BxL), rev(bpos_BxL))
  return f_BxLxD, rev(b_rev)


def candidate_pairs(L: int, min_gap: int, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
  """All (s, u), 0 <= s < u <= L-1 with min_gap <= u - s < max_gap (max_gap -1: no limit), as int32."""
  s, u = np.triu_indices(L, k=1)
  gap = u - s
  keep = (gap >= min_gap) & ((gap < max_gap) if max_gap > 0 else True)
  return s[keep].astype(np.int32), u[keep].astype(np.int32)


def pair_valid(batch: dict, s: Array, u: Array, eos_id: int) -> Array:
  """Validity of pairs (s, u) given as (P,) or (B, P) index arrays -> (B, P) bool (module docstring)."""
  x_BxL, lm_BxL, valid_BxL = batch["tokens"], batch["loss_mask"].astype(bool), batch["segment_ids"] >= 0
  take = lambda a, i: jnp.take(a, i, axis=1) if i.ndim == 1 else jnp.take_along_axis(a, i, axis=1)
  c_BxL = jnp.cumsum((x_BxL == eos_id).astype(jnp.int32), axis=1)
  between = take(c_BxL, u - 1) - take(c_BxL, s)
  return take(valid_BxL, s) & take(valid_BxL, u) & (between == 0) & take(lm_BxL, s + 1)


def touches_eos(batch: dict, s: Array, u: Array, eos_id: int) -> Array:
  x_BxL = batch["tokens"]
  return (jnp.take(x_BxL, s, axis=1) == eos_id) | (jnp.take(x_BxL, u, axis=1) == eos_id)


def next_token_logits(modules: dict, params: Any, f_BxTxD: Array, eos_id: int) -> Array:
  """Generation: logits_BxTxV from forward states and the backward state of a lone EOS (empty suffix)."""
  eos = jnp.full((1, 1), eos_id, jnp.int32)
  e = jnp.take(params["trunk"]["embed"], eos, axis=0)
  zero = jnp.zeros_like(eos)
  b_D = modules["backward"].apply({"params": params["backward"]}, e, zero, zero)[0, 0]
  z_next, _ = modules["text_head"].apply({"params": params["text_head"]}, f_BxTxD,
                                         jnp.broadcast_to(b_D, f_BxTxD.shape))
  return unembed(z_next, params["trunk"]["head"])


def build(config: Any, mesh: Any = None) -> Objective:
  modules = modules_for(config, mesh)
  trunk, backward, text_head = modules["trunk"], modules["backward"], modules["text_head"]
  o = config.objective
  eos_id = int(config.data.eos_id)
  min_gap, max_gap = int(o.bst_min_gap), int(o.bst_max_gap)
  fraction, chunk = float(o.bst_pair_fraction), int(o.bst_pair_chunk)
  normalize = o.bst_normalize
  dtype = DTYPES[trunk.cfg.dtype]

  def init(rng: jax.Array) -> Any:
    r_f, r_b, r_h = jax.random.split(rng, 3)
    D, x = trunk.cfg.d_model, jnp.zeros((1, 2), jnp.int32)
    h = jnp.zeros((1, 2, D), jnp.float32)
    return {"trunk": init_trunk(trunk, r_f), "backward": backward.init(r_b, h, x, x)["params"],
            "text_head": text_head.init(r_h, h, h)["params"]}

  def hidden(params: Any, batch: dict) -> Array:
    f_BxLxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                             batch["positions"])
    return f_BxLxD

  def chunk_loss(head_params, head_DxV, f_BxLxD, b_BxLxD, x_BxL, s, u, m_BxC):
    """Per-row sums of (CE_next + CE_prev) / 2 over a chunk of pairs, (B,)."""
    take = lambda a, i: (jnp.take(a, i, axis=1) if i.ndim == 1
                         else jnp.take_along_axis(a, i.reshape(i.shape + (1,) * (a.ndim - 2)), axis=1))
    z_next, z_prev = text_head.apply({"params": head_params}, take(f_BxLxD, s), take(b_BxLxD, u))
    adjacent = (u - s) == 1
    t_next = jnp.where(adjacent, eos_id, take(x_BxL, s + 1))
    t_prev = jnp.where(adjacent, eos_id, take(x_BxL, u - 1))
    ce = 0.5 * (token_cross_entropy(unembed(z_next, head_DxV, dtype), t_next)
                + token_cross_entropy(unembed(z_prev, head_DxV, dtype), t_prev))
    return jnp.sum(ce * m_BxC, axis=1)

  chunk_loss = jax.checkpoint(chunk_loss)
  budget = lambda P: max(1, math.ceil(fraction * P))  # pairs kept per row when fraction < 1

  def term_counts(batch: dict) -> Counts:
    """{"rows": B, "pairs": the trained pairs}. The selection keeps every valid pair up to the row's
    budget (valid pairs outrank invalid ones), so a row's count is min(valid, budget) whatever the rng."""
    B, L = batch["tokens"].shape
    s_P, u_P = candidate_pairs(L, min_gap, max_gap)
    valid_B = jnp.sum(pair_valid(batch, jnp.asarray(s_P), jnp.asarray(u_P), eos_id), axis=1)
    if fraction < 1.0:
      valid_B = jnp.minimum(valid_B, budget(len(s_P)))
    return {"rows": jnp.asarray(B, jnp.float32), "pairs": jnp.sum(valid_B.astype(jnp.float32))}

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    x_BxL = batch["tokens"]
    B, L = x_BxL.shape
    f_BxLxD, b_BxLxD = encode(modules, params, batch, eos_id)
    s_P, u_P = candidate_pairs(L, min_gap, max_gap)
    s, u = jnp.asarray(s_P), jnp.asarray(u_P)
    if fraction < 1.0:
      keep = budget(len(s_P))
      ok_BxP = pair_valid(batch, s, u, eos_id)
      prio = jnp.where(ok_BxP, 1.0 + touches_eos(batch, s, u, eos_id), -1.0)
      _, pick_BxK = jax.lax.top_k(prio + jax.random.uniform(rng, ok_BxP.shape), keep)
      s, u = jnp.take(s, pick_BxK), jnp.take(u, pick_BxK)
    P = s.shape[-1]
    size = min(chunk, P)
    n_chunks = -(-P // size)
    pad = n_chunks * size - P
    s = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, pad)], constant_values=0)
    u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)], constant_values=1)
    m = pair_valid(batch, s, u, eos_id) & (jnp.arange(n_chunks * size) < P)
    split = lambda a: jnp.moveaxis(a.reshape(a.shape[:-1] + (n_chunks, size)), -2, 0)
    head_p, head_DxV = params["text_head"], params["trunk"]["head"]

    def body(acc, xs):
      s_c, u_c, m_c = xs
      return acc + chunk_loss(head_p, head_DxV, f_BxLxD, b_BxLxD, x_BxL, s_c, u_c, m_c), None

    sums_B, _ = jax.lax.scan(body, jnp.zeros((B,), jnp.float32), (split(s), split(u), split(m)))
    counts_B = jnp.sum(m, axis=1).astype(jnp.float32)
    # "row": each row's mean is row-local, so only the number of rows is the whole batch's
    rows = B if counts is None else counts["rows"]
    if normalize == "row":
      total = jnp.sum(sums_B / jnp.maximum(counts_B, 1.0)) / rows
    else:
      pairs = jnp.sum(counts_B) if counts is None else counts["pairs"]
      total = jnp.sum(sums_B) / jnp.maximum(pairs, 1.0)
    return total, {"loss": total, "pairs": jnp.sum(counts_B) / rows}

  return Objective("bst", init, loss, hidden, modules, term_counts)
