"""Analytic model FLOPs of one train step, from the config (spec METHOD.md sections 1, 4, 6, 9).

Conventions:
- Only matrix multiplications are counted, at 2 FLOPs per multiply-add. Norms, RoPE, softmaxes, GELU /
  SiLU, the losses, the embedding gather and the optimizer update are left out (they are O(T·D) or
  O(params) elementwise work, a few percent of the step at realistic sizes; see tests/test_flops.py for
  how far XLA's own count sits above this one).
- Forward + backward = 3 × forward for every weight matmul that gets both an input and a weight gradient
  (the backward computes dX and dW, each as costly as the forward). The layer-0 QKV input gradient is
  counted too: it is needed because the embedding table is trained.
- Attention: QK^T and PV are counted as the full dense T × T product per head (4·T²·D forward per row
  and layer), which is what XLA computes for `jax.nn.dot_product_attention` with a block-diagonal causal
  mask; a causal-aware kernel would do about half of it. Backward = 2 × forward (dS, dV, dQ, dK).
- Tokens fed to the trunk: GPT feeds x[:, :-1] (T = L - 1 per row of length L); NextLat feeds the whole
  row (T = L) so that h_{L-1} exists as a latent target. The CE head runs over L - 1 positions for both.
- NextLat extras, per rollout step i = 1..d:
  - the dynamics MLP p_psi over L - i positions, forward + backward = 6 · P_psi · (L - i), where
    P_psi = 2D·H + H² + H·D are its matmul weights (the 2D RMSNorm is elementwise and not counted);
  - the KL student head ĥ · sg[W_head] over L - i - 1 positions: forward 2·D·V plus backward to ĥ only
    2·D·V (the head is frozen for this loss, so no weight gradient): 4·D·V per position.
  The teacher logits reuse the CE logits (no extra matmul).
- Rematerialisation (model.remat, objective.remat_rollout) recomputes forwards; that recompute is NOT
  counted: these are model FLOPs (as in MFU), not hardware FLOPs.
"""
from __future__ import annotations

from typing import Any

from nextlat_jax.models.transformer import ffn_width


def _model_dims(config: Any) -> tuple[int, int, int, int, int]:
  m = config.model
  D, V, n_layer = int(m.d_model), int(m.vocab_size), int(m.n_layer)
  F = ffn_width(D, int(m.get("ffn_width", 0) or 0))
  H = int(config.dynamics.hidden) if "dynamics" in config else 0
  return D, V, n_layer, F, H


def matmul_params(config: Any) -> dict[str, int]:
  """Matmul weights per token (multiply-adds per token for one forward), by component.

  `layer` is one transformer block (qkv 3D² + out D² + SwiGLU in 2·D·F + out F·D); `trunk` is all
  blocks; `head` is D·V; `dynamics` is P_psi = 2D·H + H² + H·D (0 when config has no dynamics block).
  The embedding table is a gather, not a matmul, and is not counted.
  """
  D, V, n_layer, F, H = _model_dims(config)
  layer = {"qkv": 3 * D * D, "out": D * D, "mlp_in": 2 * D * F, "mlp_out": F * D}
  per_layer = sum(layer.values())
  out = {f"layer_{k}": v for k, v in layer.items()}
  out.update(layer=per_layer, trunk=n_layer * per_layer, head=D * V,
             dynamics=(2 * D * H + H * H + H * D) if H else 0)
  return out


def train_flops_per_step(config: Any, row_len: int, batch: int) -> dict[str, float]:
  """Model FLOPs of one train step (forward + backward) for `batch` rows of `row_len` tokens.

  Reads config.model, config.dynamics.hidden and config.objective (name, horizon). Returns a breakdown
  (all floats, whole global batch):
    trunk_tokens   tokens fed to the trunk per row (L - 1 for GPT, L for NextLat)
    trunk          weight matmuls of the blocks, 6 · P_trunk · tokens
    attention      dense QK^T and PV, 3 · 4 · T² · D per row and layer
    head           CE head over L - 1 positions, 6 · D · V each
    dynamics       NextLat: sum over i of 6 · P_psi · (L - i)           (0 for GPT)
    kl_head        NextLat: sum over i of 4 · D · V · (L - i - 1)       (0 for GPT)
    forward        forward-only FLOPs (for reference)
    total          trunk + attention + head + dynamics + kl_head
  """
  L, B = int(row_len), int(batch)
  D, V, n_layer, _, _ = _model_dims(config)
  p = matmul_params(config)
  name = config.objective.name
  if name == "gpt":
    T, horizon = L - 1, 0
  elif name == "nextlat":
    T, horizon = L, int(config.objective.horizon)
  elif name in BASELINES:  # MTP, DeepSeek MTP, JTP, BST: the section at the end of this file
    return baseline_train_flops_per_step(config, row_len, batch)
  else:
    raise ValueError(f"objective.name={name!r}: no FLOP model")
  if horizon >= L - 1:
    raise ValueError(f"objective.horizon={horizon}: must be < row_len - 1 = {L - 1}")
  trunk_fwd = 2.0 * p["trunk"] * T * B
  attn_fwd = 4.0 * T * T * D * n_layer * B
  head_fwd = 2.0 * p["head"] * (L - 1) * B
  dyn_positions = sum(L - i for i in range(1, horizon + 1)) * B
  kl_positions = sum(L - i - 1 for i in range(1, horizon + 1)) * B
  out = {
      "trunk_tokens": float(T),
      "trunk": 3.0 * trunk_fwd,
      "attention": 3.0 * attn_fwd,
      "head": 3.0 * head_fwd,
      "dynamics": 6.0 * p["dynamics"] * dyn_positions,
      "kl_head": 4.0 * p["head"] * kl_positions,
  }
  out["forward"] = (trunk_fwd + attn_fwd + head_fwd + 2.0 * p["dynamics"] * dyn_positions
                    + 2.0 * p["head"] * kl_positions)
  out["total"] = out["trunk"] + out["attention"] + out["head"] + out["dynamics"] + out["kl_head"]
  return out


# ------------------------------------------------------------------------------------------------------
# Baselines (issue 6; BASELINES.md): MTP, DeepSeek-V3 MTP, JTP, BST, and inference FLOPs per token for
# every objective. Same conventions as above: matmuls only, 2 FLOPs per multiply-add, forward + backward
# = 3 x forward, dense T x T attention, positions counted as the code computes them.
# ------------------------------------------------------------------------------------------------------
BASELINES = ("mtp", "mtp_deepseek", "jtp", "bst")


def baseline_train_flops_per_step(config: Any, row_len: int, batch: int) -> dict[str, float]:
  """Model FLOPs of one train step for a baseline objective (whole global batch). Keys:
    trunk_tokens   tokens fed to the trunk per row (L - 1; BST: L, through both encoders)
    trunk          block matmuls of the trunk (MTP: n_layer - 1 blocks; BST: forward + backward stacks)
    attention      dense QK^T and PV of every attention layer over the row (trunk, MTP heads, DeepSeek
                   modules; BST both encoders)
    head           output-head matmuls: MTP head i over L-1-i positions; DeepSeek main head over L-1 and
                   module k over L-1-k; JTP every slot over L-1 positions; BST two per pair
    aux            the baseline's own matmuls: MTP head blocks (d+1 over L-1 positions); DeepSeek module
                   projections + blocks (+ their attention); JTP Fetch QKV/out over (d+1)(L-1) slot
                   vectors + slot attention; BST text head per pair
    pairs          BST: pairs evaluated per row (all candidates, or the fraction budget); else 0
    forward, total
  """
  L, B = int(row_len), int(batch)
  D, V, n_layer, _, _ = _model_dims(config)
  p = matmul_params(config)
  o = config.objective
  name, d = o.name, int(o.get("horizon", 1))
  T, pl = L - 1, p["layer"]
  fwd = dict(trunk=0.0, attention=0.0, head=0.0, aux=0.0)
  pairs = 0
  if name in ("mtp", "mtp_deepseek", "jtp") and d >= L - 1:
    raise ValueError(f"objective.horizon={d}: must be < row_len - 1 = {L - 1}")
  if name == "mtp":
    fwd["trunk"] = 2.0 * pl * (n_layer - 1) * T
    fwd["aux"] = 2.0 * pl * (d + 1) * T
    fwd["attention"] = 4.0 * T * T * D * (n_layer - 1 + d + 1)
    fwd["head"] = 2.0 * D * V * sum(L - 1 - i for i in range(d + 1))
  elif name == "mtp_deepseek":
    n_k = [L - 1 - k for k in range(1, d + 1)]
    fwd["trunk"] = 2.0 * pl * n_layer * T
    fwd["attention"] = 4.0 * T * T * D * n_layer + sum(4.0 * n * n * D for n in n_k)
    fwd["head"] = 2.0 * D * V * (T + sum(n_k))
    fwd["aux"] = sum(2.0 * (2 * D * D + pl) * n for n in n_k)
  elif name == "jtp":
    S = d + 1
    fwd["trunk"] = 2.0 * pl * n_layer * T
    fwd["attention"] = 4.0 * T * T * D * n_layer
    fwd["head"] = 2.0 * D * V * T * S
    fwd["aux"] = 2.0 * 4 * D * D * T * S + 4.0 * S * S * D * T
  elif name == "bst":
    import math
    from nextlat_jax.objectives.bst import candidate_pairs
    T = L
    pairs = len(candidate_pairs(L, int(o.get("bst_min_gap", 1)), int(o.get("bst_max_gap", -1)))[0])
    if float(o.get("bst_pair_fraction", 1.0)) < 1.0:
      pairs = max(1, math.ceil(float(o.bst_pair_fraction) * pairs))
    H2 = ffn_width(2 * D)
    fwd["trunk"] = 2 * 2.0 * pl * n_layer * L
    fwd["attention"] = 2 * 4.0 * L * L * D * n_layer
    fwd["head"] = 2.0 * D * V * 2 * pairs
    fwd["aux"] = 2.0 * (2 * D * 2 * H2 + H2 * 2 * D) * pairs
  else:
    raise ValueError(f"objective.name={name!r}: not a baseline (known: {', '.join(BASELINES)})")
  out = {k: 3.0 * v * B for k, v in fwd.items()}
  out.update(trunk_tokens=float(T), pairs=float(pairs), forward=sum(fwd.values()) * B)
  out["total"] = out["trunk"] + out["attention"] + out["head"] + out["aux"]
  return out


def inference_flops_per_token(config: Any, row_len: int) -> float:
  """Forward FLOPs per token of the deployed model scoring a row of L - 1 tokens (dense attention):
  2 x inference matmul weights + 4 T D per attention layer. The deployed model is the trunk + head for
  GPT, NextLat, DeepSeek MTP; n_layer - 1 trunk blocks + head 0 for MTP; + Fetch on one slot (its QKV and
  out projections as the module runs them) for JTP; the forward encoder + text head + one output head for
  BST generation (the backward state of a lone EOS is a constant)."""
  T = int(row_len) - 1
  D, V, n_layer, _, _ = _model_dims(config)
  p = matmul_params(config)
  matmul = p["trunk"] + p["head"]
  name = config.objective.name
  if name == "jtp":
    matmul += 4 * D * D
  elif name == "bst":
    H2 = ffn_width(2 * D)
    matmul += 2 * D * 2 * H2 + H2 * 2 * D
  elif name not in ("gpt", "nextlat", "mtp", "mtp_deepseek"):
    raise ValueError(f"objective.name={name!r}: no FLOP model")
  return 2.0 * matmul + 4.0 * T * D * n_layer
