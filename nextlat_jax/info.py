"""`nextlat info --config=...`: parameter counts (training / inference, per top-level param group and
total) and FLOPs per token, as JSON. Shapes come from `jax.eval_shape` (nothing is allocated), so it runs
for the 1.3B configuration on a laptop.

Inference parameters are those the deployed next-token model uses: everything for GPT and JTP (next-token
inference runs through Fetch); the trunk only for NextLat (p_psi is training / drafting only) and DeepSeek
MTP (its modules are training / drafting only); the trunk and head 0 for MTP; for BST the forward encoder
and the text head (generation; the backward state of a lone EOS is a constant), with
`inference_scoring` = both encoders. Paper Table 4 lists BST generation as 1.32B, which matches the
forward encoder alone; we count the text head too (see docs/baselines.md).
"""
from __future__ import annotations

import json
import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from nextlat_jax import config as config_lib
from nextlat_jax import flops as flops_lib
from nextlat_jax import objectives
from nextlat_jax.models.transformer import ModelConfig


def count(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_params(config: ml_collections.ConfigDict) -> dict:
  """The objective's parameter shapes (unboxed ShapeDtypeStructs), without allocating them."""
  objective = objectives.build(config, None)
  return nn.unbox(jax.eval_shape(objective.init, jax.random.PRNGKey(0)))


def inference_params(name: str, params: dict) -> dict:
  """The sub-tree of `params` that the deployed next-token model uses (module docstring)."""
  if name in ("gpt", "jtp"):
    return dict(params)
  if name in ("nextlat", "mtp_deepseek"):
    return {"trunk": params["trunk"]}
  if name == "mtp":
    return {"trunk": params["trunk"], "heads": {"head_0": params["heads"]["head_0"]}}
  if name == "bst":
    return {"trunk": params["trunk"], "text_head": params["text_head"]}
  raise ValueError(f"objective.name={name!r}: no inference rule")


def param_counts(config: ml_collections.ConfigDict) -> dict:
  params = abstract_params(config)
  name = config.objective.name
  inf = inference_params(name, params)
  out = {"training": {k: count(v) for k, v in params.items()},
         "inference": {k: count(v) for k, v in inf.items()}}
  out["training"]["total"] = count(params)
  out["inference"]["total"] = count(inf)
  if name == "bst":
    out["inference_scoring"] = {"total": count(params)}
  return out


def flops_per_token(config: ml_collections.ConfigDict, row_len: int) -> dict:
  """Train FLOPs (forward + backward) per trained position (row_len - 1 per row) and inference forward
  FLOPs per token, from nextlat_jax.flops."""
  train = flops_lib.train_flops_per_step(config, row_len, 1)
  per = {k: v / (row_len - 1) for k, v in train.items() if k not in ("trunk_tokens", "pairs")}
  return {"row_len": row_len, "train": per.pop("total"), "train_forward": per.pop("forward"),
          "train_breakdown": per, "inference": flops_lib.inference_flops_per_token(config, row_len)}


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
  """Fills vocab size / EOS id from the dataset when needed, validates (mesh excluded); returns row_len."""
  config = ml_collections.ConfigDict(config.to_dict())
  data = config.get("data") or ml_collections.ConfigDict()
  row_len = int(data.get("seq_len", 1024)) + 1
  if not config.model.vocab_size or "eos_id" not in data:
    from nextlat_jax.data import pipeline
    from nextlat_jax.train import preflight
    try:
      ds = pipeline.dataset_info(config.data)
    except (ValueError, FileNotFoundError, AttributeError) as e:
      raise config_lib.ConfigError("data", data.get("name"), str(e)) from None
    preflight.fill_from_data(config, ds)
    row_len = ds.row_len
  with config.unlocked():
    config.mesh.update(data=1, fsdp=1, tensor=1)  # counts do not depend on the mesh
  config_lib.validate(config, num_devices=1)
  return config, row_len


def info(config: ml_collections.ConfigDict) -> dict:
  config, row_len = resolve(config)
  o = config.objective
  return {"objective": o.name, "horizon": int(o.horizon) if o.name not in ("gpt", "bst") else None,
          "model": dict({k: config.model[k] for k in ("n_layer", "d_model", "n_head", "vocab_size")},
                        ffn_width=ModelConfig.from_config(config.model).ffn),
          "params": param_counts(config), "flops_per_token": flops_per_token(config, row_len)}


def main(argv: list[str]) -> None:
  del argv
  from absl import app, flags
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("info needs --config")
  print(json.dumps(info(config), indent=2))
