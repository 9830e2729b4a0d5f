"""GPT: plain next-token cross-entropy on the trunk (the baseline every method is compared with)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nextlat_jax.models.transformer import DTYPES, Constrain, ModelConfig, Transformer
from nextlat_jax.objectives.base import Objective
from nextlat_jax.objectives.losses import Counts, denominators, mask_counts
from nextlat_jax.objectives.vocab_losses import head_cross_entropy
from nextlat_jax.parallel.sharding import logical_rules


def trunk_module(config: Any, mesh: Any = None) -> Transformer:
  return Transformer(ModelConfig.from_config(config.model), mesh=mesh,
                     rules=logical_rules(config) if mesh is not None else ())


def init_trunk(trunk: Transformer, rng: jax.Array) -> Any:
  x = jnp.zeros((1, 2), jnp.int32)
  return trunk.init(rng, x, x, x)["params"]


def vocab_options(config: Any, trunk: Transformer) -> dict:
  """The keyword arguments of the vocabulary-wide losses (objectives/vocab_losses.py) for this trunk."""
  return dict(dtype=DTYPES[trunk.cfg.dtype], chunk=int(config.objective.vocab_chunk),
              constrain=Constrain(trunk.mesh, trunk.rules))


def build(config: Any, mesh: Any = None) -> Objective:
  trunk = trunk_module(config, mesh)
  vocab = vocab_options(config, trunk)

  def init(rng: jax.Array) -> Any:
    return {"trunk": init_trunk(trunk, rng)}

  def forward(params: Any, batch: dict) -> jax.Array:
    h_BxTxD, _ = trunk.apply({"params": params["trunk"]}, batch["tokens"][:, :-1],
                             batch["segment_ids"][:, :-1], batch["positions"][:, :-1])
    return h_BxTxD

  def term_counts(batch: dict) -> Counts:
    return mask_counts({"ce": batch["loss_mask"][:, 1:]})

  def loss(params: Any, batch: dict, rng: jax.Array, counts: Counts | None = None):
    del rng
    denom = denominators(counts)
    h_BxTxD = forward(params, batch)
    mask_BxT = batch["loss_mask"][:, 1:]
    targets_BxT = batch.get("labels", batch["tokens"])[:, 1:]  # task labels (A5) or the next tokens
    ce = head_cross_entropy(h_BxTxD, params["trunk"]["head"], targets_BxT, mask_BxT, denom("ce"), **vocab)
    return ce, {"loss": ce, "ce": ce}

  return Objective("gpt", init, loss, forward, {"trunk": trunk}, term_counts)
