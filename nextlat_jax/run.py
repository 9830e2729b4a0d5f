"""A finished run, loaded for reading: `load_run(workdir, step, mesh)` gives every command that reads a
run (eval, generate, bench decode, export-hf, lm-eval) the same `Run`: the saved config re-meshed for
this machine, the parameters (only: no optimizer is built, no optimizer state read) restored onto the
mesh by the logical sharding rules, the objective and its modules, the trunk's ModelConfig, the
tokenizer, the EOS / pad ids and the step.

The abstract parameters come from the objective's init under `jax.eval_shape`, with the NamedShardings
of `parallel/sharding.py`, so a run trained on one mesh restores onto any other (Orbax reshards).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from nextlat_jax import config as config_lib
from nextlat_jax import objectives
from nextlat_jax.data import pipeline, tokenizers
from nextlat_jax.models.transformer import ModelConfig
from nextlat_jax.parallel import sharding
from nextlat_jax.parallel.mesh import MESH_AXES, make_mesh
from nextlat_jax.train import checkpoint
from nextlat_jax.train.preflight import resolve

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run's parameters on a mesh of this machine's devices, and what reading them needs."""
  workdir: str  # "" for parameters that do not come from a run folder (Run.from_params)
  config: ml_collections.ConfigDict  # resolved (vocab size, EOS id filled in), meshed for `mesh`; locked
  params: Any  # the parameter tree, sharded by `param_shardings`
  step: int
  mesh: Mesh
  rules: tuple  # the logical axis rules (config.mesh.rules)
  objective: objectives.Objective  # its modules bound to `mesh` (sharding constraints on activations)
  modules: dict[str, nn.Module]  # the same modules without a mesh (decoding: p_psi, JTP's Fetch, MTP's heads)
  cfg: ModelConfig  # the trunk
  eos_id: int
  pad_id: int
  row_len: int  # the trained row length, T + 1 tokens (data.seq_len + 1, or the prepared manifest's)
  param_shardings: Any  # NamedShardings, the tree of `params`
  batch_sharding: NamedSharding  # rows over the batch axes

  @functools.cached_property
  def tokenizer(self) -> Any:
    """The run's tokenizer (encode / decode / eos_id), or None for id-only data (read on first use)."""
    return run_tokenizer(self.config)

  @classmethod
  def from_params(cls, config: ml_collections.ConfigDict, params: Any, mesh: Mesh, step: int = 0,
                  workdir: str = "") -> Run:
    """A Run of parameters already in memory (e.g. freshly initialised); `config` resolved for `mesh`."""
    info = pipeline.dataset_info(config.data)
    objective, param_sh, batch_sh, _ = placement(config, mesh)
    return _make(workdir, config, params, step, mesh, info, objective, param_sh, batch_sh)


def run_config(workdir: str, step: int | None = None, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config checkpoint `step` (None: the newest) was trained with, re-meshed for the devices here
  (all on `data`), then `overrides` ({"mesh.fsdp": 2, "eval_steps": 4, ...}) applied; not resolved."""
  config = config_lib.from_saved(checkpoint.saved_config(os.path.join(workdir, "checkpoints"), step))
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  for key, value in (overrides or {}).items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def placement(config: ml_collections.ConfigDict, mesh: Mesh
              ) -> tuple[objectives.Objective, Any, NamedSharding, Any]:
  """(objective bound to `mesh`, param shardings, batch sharding, abstract params carrying the shardings),
  from the objective's init under jax.eval_shape: nothing is allocated, no optimizer is built."""
  rules = sharding.logical_rules(config)
  objective = objectives.build(config, mesh)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0))
  param_sh = sharding.param_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                          param_sh)
  return objective, param_sh, sharding.batch_sharding(mesh, rules), abstract


def load_run(workdir: str, step: int | None = None, mesh: Mesh | dict | None = None, *,
             overrides: dict | None = None) -> Run:
  """The run in `workdir` at checkpoint `step` (None: the newest), parameters only.

  `mesh`: None puts all of this machine's devices on `data`; a dict sets axis sizes over all devices
  ({"fsdp": 2, "tensor": 2}, one may be -1); a Mesh is used as it is (any subset of the devices).
  `overrides`: config values to change before resolving (run_config). A missing or unreadable step
  raises checkpoint.CheckpointMissing (one line)."""
  if isinstance(mesh, Mesh):
    axes = {a: int(mesh.shape[a]) for a in MESH_AXES}
  else:
    axes = dict(mesh or {})
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh={axes}: unknown axes {unknown} (axes: {', '.join(MESH_AXES)})")
  config = run_config(workdir, step, {**{f"mesh.{k}": v for k, v in axes.items()}, **(overrides or {})})
  if mesh is None:
    mesh = _reading_mesh(config, workdir)
  config, info = resolve(config, mesh.devices.size if isinstance(mesh, Mesh) else None)
  if not isinstance(mesh, Mesh):
    mesh = make_mesh(config.mesh)
  objective, param_sh, batch_sh, abstract = placement(config, mesh)
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract, step)
  log.info("loaded step %d of %s onto mesh %s", step, workdir, dict(mesh.shape))
  return _make(workdir, config, params, int(step), mesh, info, objective, param_sh, batch_sh)


def _reading_mesh(config: ml_collections.ConfigDict, workdir: str) -> Mesh | None:
  """None (all devices on `data`) when the run's batch splits over them; otherwise a `data` mesh over the
  first d devices, d the largest that splits batch_size / microbatches (single process only), with a
  warning: a run trained on 8 devices with batch 16 is then readable on 12."""
  n, rows = jax.device_count(), int(config.batch_size) // max(int(config.microbatches), 1)
  if rows % n == 0 or jax.process_count() > 1:
    return None
  d = max(k for k in range(1, n + 1) if rows % k == 0)
  log.warning("reading %s on %d of %d devices: its batch_size=%d (microbatches=%d) does not split over %d; "
              "pass a mesh to choose another layout", workdir, d, n, int(config.batch_size),
              int(config.microbatches), n)
  with config.unlocked():
    config.mesh.update(data=d, fsdp=1, tensor=1)
  return make_mesh(config.mesh, jax.devices()[:d])


def _make(workdir: str, config: ml_collections.ConfigDict, params: Any, step: int, mesh: Mesh,
          info: pipeline.DatasetInfo, objective: objectives.Objective, param_sh: Any, batch_sh: NamedSharding) -> Run:
  """The Run of placed parameters; `info`: the data's DatasetInfo (EOS and pad ids)."""
  return Run(workdir=workdir, config=config, params=params, step=step, mesh=mesh,
             rules=sharding.logical_rules(config), objective=objective, modules=objectives.build(config, None).modules,
             cfg=ModelConfig.from_config(config.model), eos_id=int(info.eos_id), pad_id=int(info.pad_id),
             row_len=int(info.row_len), param_shardings=param_sh, batch_sharding=batch_sh)


def run_tokenizer(config: ml_collections.ConfigDict) -> Any:
  """The tokenizer of a run's data (encode / decode / eos_id), or None when it has none (token-id tasks).

  data.tokenizer names one (with data.tokenizer_path; "gpt2" with no path: the installed or cached GPT-2
  files, nextlat_jax.data.tokenizers.load); prepared data: the copy in the prepared folder (its manifest);
  other datasets: their source's tokenizer (a source that cannot be opened here gives None, with a
  warning naming why).
  """
  data = config.data
  if "tokenizer" in data:
    return tokenizers.load(data.tokenizer, data.get("tokenizer_path", "") or "")
  if data.get("name") == "pretokenized":
    from nextlat_jax.data.sources import pretokenized
    return pretokenized.manifest_tokenizer(data.path)
  try:
    tok = getattr(pipeline.make_source(data, split="eval", seed=0), "tokenizer", None)
  except (ValueError, FileNotFoundError, OSError) as e:
    log.warning("data.name=%r: cannot open its source for the tokenizer (%s: %s)", data.get("name"),
                type(e).__name__, e)
    return None
  return tok if tok is not None and hasattr(tok, "encode") and hasattr(tok, "decode") else None
