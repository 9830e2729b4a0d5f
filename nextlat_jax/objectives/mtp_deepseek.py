"""DeepSeek-V3 sequential multi-token prediction (spec BASELINES.md section 3; not evaluated in the paper).

The main model is the GPT trunk (n_layer blocks + final norm), giving h^0. D_mtp = objective.horizon
sequential modules share the embedding E and the output head; module k (k = 1..D_mtp) owns two RMSNorms,
a bias-free projection M_k (2D -> D), one transformer block TRM_k and (objective.deepseek_final_norm,
default True as in the public implementations) a final RMSNorm before the shared head:

  h'^k_i = M_k [RMSNorm(E(x_{i+k})) ; RMSNorm(h^{k-1}_i)]     (objective.deepseek_concat:
           "embedding_first", the public implementations' order and the default; or "hidden_first",
           the technical report's equation)
  h^k    = TRM_k(h'^k), causal over positions, with the row's own segment ids and positions
  P^k_{i+k+1} = softmax(Head(FinalNorm_k(h^k_i)))

Module k + 1 reads the block output h^k (before the final norm). Loss:
CE_main + lambda_mtp / D_mtp * sum_k CE^k, each CE a masked mean (DeepSeek-V3 used lambda 0.3 then 0.1).

Masks (the spec is silent on documents here; our choice): module k's target x_{i+k+1} is trained iff it
is a trained next-token target (loss_mask: prompt, padding), position i is not padding, and none of
x_{i+1}..x_{i+k} is EOS (no target from a different document; an EOS target itself is trained) -- the
same rule as MTP's "intended" mask and JTP's window rule.

hidden(): the main trunk's post-norm h, as for GPT. Drafting: `draft_logits`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextlat_jax.errors import need
from nextlat_jax.models.transformer import (DTYPES, Block, ModelConfig, RMSNorm, _init, _remat_policy,
                                            document_mask, unembed)
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.gpt import init_trunk, trunk_module, vocab_options
from nextlat_jax.objectives.losses import Counts, denominators, mask_counts
from nextlat_jax.objectives.vocab_losses import head_cross_entropy
from nextlat_jax.objectives.mtp import eos_count, validate_aux
from nextlat_jax.parallel.sharding import logical_rules

Array = jax.Array
CONCAT_ORDERS = ("embedding_first", "hidden_first")


def validate(config: Any) -> None:
  """DeepSeek-V3 MTP's keys; raises ConfigError for the first bad value."""
  o = config.objective
  validate_aux(config)
  need(o.deepseek_concat in CONCAT_ORDERS, "objective.deepseek_concat", o.deepseek_concat,
       "must be 'embedding_first' or 'hidden_first'")


class MTPDepth(nn.Module):
  """Module k: (h^{k-1}, E(x_{i+k})) -> (h^k block output, the state fed to the shared head)."""
  cfg: ModelConfig
  concat: str = "embedding_first"
  final_norm: bool = True
  mesh: Any = None
  rules: tuple = ()

  @nn.compact
  def __call__(self, h_BxTxD: Array, e_BxTxD: Array, segment_ids_BxT: Array, positions_BxT: Array):
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    h_n = RMSNorm(cfg.norm_eps, pdtype, name="hidden_norm", out_dtype=dtype)(h_BxTxD)
    e_n = RMSNorm(cfg.norm_eps, pdtype, name="embed_norm", out_dtype=dtype)(e_BxTxD)
    pair = [e_n, h_n] if self.concat == "embedding_first" else [h_n, e_n]
    x_BxTxD = nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, param_dtype=pdtype, name="proj",
                       kernel_init=_init(cfg.init_std, ("mtp_in", "embed")))(jnp.concatenate(pair, axis=-1))
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=True)
    x_BxTxD, _ = block(cfg, self.mesh, self.rules, name="block")(x_BxTxD, document_mask(segment_ids_BxT),
                                                                 positions_BxT)
    out_BxTxD = x_BxTxD.astype(jnp.float32)
    if self.final_norm:
      out_BxTxD = RMSNorm(cfg.norm_eps, pdtype, name="final_norm", out_dtype=jnp.float32)(x_BxTxD)
    return x_BxTxD, out_BxTxD


class MTPModules(nn.Module):
  """The D_mtp sequential modules `depth_0` (k = 1) .. `depth_{D-1}` (k = D)."""
  cfg: ModelConfig
  depths: int
  concat: str = "embedding_first"
  final_norm: bool = True
  mesh: Any = None
  rules: tuple = ()

  def setup(self):
    self.depth = [MTPDepth(self.cfg, self.concat, self.final_norm, self.mesh, self.rules)
                  for _ in range(self.depths)]

  def __call__(self, h_BxTxD, e_BxTxD, segment_ids_BxT, positions_BxT):  # init only: every module once
    return [m(h_BxTxD, e_BxTxD, segment_ids_BxT, positions_BxT) for m in self.depth]

  def one(self, h_BxTxD, e_BxTxD, segment_ids_BxT, positions_BxT, k: int):
    """Module k (1-based)."""
    return self.depth[k - 1](h_BxTxD, e_BxTxD, segment_ids_BxT, positions_BxT)


def modules_for(config: Any, mesh: Any = None) -> dict[str, nn.Module]:
  o = config.objective
  rules = logical_rules(config) if mesh is not None else ()
  return {"trunk": trunk_module(config, mesh),
          "mtp": MTPModules(ModelConfig.from_config(config.model), int(o.horizon),
                            o.deepseek_concat, bool(o.deepseek_final_norm),
                            mesh, rules)}


def target_mask(batch: dict, k: int, eos_id: int) -> Array:
  """(B, L-1-k) bool: whether module k's target x_{i+k+1} at position i is trained (k = 0: main head)."""
  L = batch["tokens"].shape[1]
  n = L - 1 - k
  m = batch["loss_mask"][:, 1 + k:].astype(bool) & (batch["segment_ids"][:, :n] >= 0)
  return m if k == 0 else m & (eos_count(batch["tokens"], eos_id, k, n) == 0)


def draft_logits(modules: dict, params: Any, h0_BxTxD: Array, tokens_BxT: Array, segment_ids_BxT: Array,
                 positions_BxT: Array, drafts_BxK: Array) -> Array:
  """logits_Bx(K+1)xV (float32) at the last position T - 1, K <= D_mtp.

  Entry 0 is the main head on h^0_{T-1} (the next-token distribution, the verifier's); entry k is module
  k's distribution for token k + 1 after the prefix, teacher-forced on drafts_BxK: drafts[:, k-1] is the
  k-th drafted token (drafts[:, 0] = the token chosen from entry 0). Entry k depends only on drafts[:, :k],
  so an autoregressive drafter calls this with the drafts so far and reads the last entry.
  h0_BxTxD (post-norm trunk states), tokens, segment ids and positions cover the prefix, column T - 1 being
  its last token. Module k attends over the whole prefix (no cache here).
  """
  head_DxV, T, K = params["trunk"]["head"], tokens_BxT.shape[1], drafts_BxK.shape[1]
  stream_BxN = jnp.concatenate([tokens_BxT, drafts_BxK.astype(tokens_BxT.dtype)], axis=1)
  out = [unembed(h0_BxTxD[:, -1:], head_DxV)[:, 0]]
  h_BxTxD = h0_BxTxD
  for k in range(1, K + 1):
    e_BxTxD = jnp.take(params["trunk"]["embed"], stream_BxN[:, k:k + T], axis=0)
    h_BxTxD, o_BxTxD = modules["mtp"].apply({"params": params["mtp"]}, h_BxTxD, e_BxTxD, segment_ids_BxT,
                                            positions_BxT, k, method=MTPModules.one)
    out.append(unembed(o_BxTxD[:, -1:], head_DxV)[:, 0])
  return jnp.stack(out, axis=1)


def build(config: Any, mesh: Any = None) -> Objective:
  modules = modules_for(config, mesh)
  trunk, mtp = modules["trunk"], modules["mtp"]
  depths, lam = int(config.objective.horizon), float(config.objective.lambda_mtp)
  eos_id = int(config.data.eos_id)
  vocab = vocab_options(config, trunk)

  def init(rng: jax.Array) -> Any:
    r_trunk, r_mtp = jax.random.split(rng)
    x = jnp.zeros((1, 2), jnp.int32)
    h = jnp.zeros((1, 2, trunk.cfg.d_model), jnp.float32)
    return {"trunk": init_trunk(trunk, r_trunk), "mtp": mtp.init(r_mtp, h, h, x, x)["params"]}

  def hidden(params: Any, batch: dict) -> Array:
    h_BxLxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"], batch["segment_ids"],
                             batch["positions"])
    return h_BxLxD

  def depth_loss(mtp_params, head_DxV, h_BxNxD, e_BxNxD, seg_BxN, pos_BxN, targets_BxN, mask_BxN, k, count=None):
    h_BxNxD, o_BxNxD = mtp.apply({"params": mtp_params}, h_BxNxD, e_BxNxD, seg_BxN, pos_BxN, k,
                                 method=MTPModules.one)
    ce = head_cross_entropy(o_BxNxD, head_DxV, targets_BxN, mask_BxN, count, **vocab)
    return h_BxNxD, ce

  if config.objective.remat_rollout:
    depth_loss = jax.checkpoint(depth_loss, static_argnums=(8,))

  def term_counts(batch: dict) -> Counts:
    masks = {"ce": target_mask(batch, 0, eos_id)}
    return mask_counts(masks | {f"ce_{k}": target_mask(batch, k, eos_id) for k in range(1, depths + 1)})

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    del rng
    denom = denominators(counts)
    x_BxL = batch["tokens"]
    L = x_BxL.shape[1]
    seg_BxL, pos_BxL = batch["segment_ids"], batch["positions"]
    h_BxTxD, e_BxTxD = trunk.apply({"params": params["trunk"]}, x_BxL[:, :-1], seg_BxL[:, :-1],
                                   pos_BxL[:, :-1])
    head_DxV = params["trunk"]["head"]
    ce = head_cross_entropy(h_BxTxD, head_DxV, x_BxL[:, 1:], target_mask(batch, 0, eos_id), denom("ce"), **vocab)
    metrics, aux = {"ce": ce}, 0.0
    for k in range(1, depths + 1):
      n = L - 1 - k  # module k runs on positions i = 0..n-1: inputs E(x_{i+k}), targets x_{i+k+1}
      h_BxTxD, ce_k = depth_loss(params["mtp"], head_DxV, h_BxTxD[:, :n], e_BxTxD[:, k:k + n], seg_BxL[:, :n],
                                 pos_BxL[:, :n], x_BxL[:, k + 1:], target_mask(batch, k, eos_id), k, denom(f"ce_{k}"))
      metrics[f"ce_{k}"] = ce_k
      aux = aux + ce_k
    total = ce + lam * aux / depths
    metrics.update(loss=total, mtp=aux / depths)
    return total, metrics

  return Objective("mtp_deepseek", init, loss, hidden, modules, term_counts)
