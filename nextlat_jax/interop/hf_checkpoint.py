"""Hugging Face `LlamaForCausalLM` checkpoints of the trunk: the weights in and out.

Export (`export_run`): the trunk of a loaded run (params["trunk"], the inference model of GPT and
NextLat runs; p_psi is not exported) -> HF_DIR/config.json (interop/hf_config.py) + model.safetensors
(the parameter dtype) + the run's tokenizer in HF form when it has one (interop/hf_tokenizer.py), every
file mode 0644; max_position_embeddings is the trained row length (data.seq_len + 1). The
weight maps are `nextlat_jax.interop.hf_llama` (exact both ways).

Import (`load_hf`, `write_init_checkpoint`): an HF Llama folder -> the trunk's parameter tree (its
config.json read, and refused where the trunk cannot represent it, by hf_config). `write_init_checkpoint`
writes OUT/checkpoints/0: a complete step-0 train state of a config (trunk = the HF weights, the other
parameters such as NextLat's p_psi freshly initialised from config.seed, a fresh optimizer state), so a
run starts from it with `nextlat train --config=configs/x.py --workdir=RUN
--config.checkpoint.restore_from=DIR` (the same config and overrides; its model fields must match the
HF config, checked here). DIR is also a run folder for `nextlat eval / lm-eval / export-hf --workdir=DIR`.
The commands are interop/export_hf.py and interop/import_hf.py.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from nextlat_jax.errors import ConfigError, need_output_folder
from nextlat_jax.interop import hf_config, hf_llama, hf_tokenizer
from nextlat_jax.models.transformer import ModelConfig
from nextlat_jax.run import load_run

WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def _safetensors() -> Any:
  try:
    import safetensors.numpy
  except ImportError:
    raise ValueError("Hugging Face checkpoints need safetensors: pip install 'nextlat_jax[hf]'") from None
  return safetensors.numpy


def _file_mode() -> int:
  """0644 less the umask (safetensors writes 0600 otherwise)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o644 & ~umask


def save_hf(trunk: Any, cfg: ModelConfig, out_dir: str, *, max_position_embeddings: int,
            eos_token_id: int | None, files: dict[str, str] | None = None) -> None:
  """Writes OUT/config.json, OUT/model.safetensors and `files` (e.g. tokenizer files), each mode 0644
  (less the umask)."""
  save_file = _safetensors().save_file
  sd = hf_llama.to_hf_llama_state_dict(jax.device_get(trunk), cfg)
  os.makedirs(out_dir, exist_ok=True)
  save_file(sd, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  config = hf_config.hf_config(cfg, max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id)
  texts = {"config.json": json.dumps(config, indent=2), **(files or {})}
  for name, text in texts.items():
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      f.write(text)
  for name in [WEIGHTS, *texts]:
    os.chmod(os.path.join(out_dir, name), _file_mode())


def check_out_dir(workdir: str, out_dir: str) -> None:
  """Refuses an --out that export would damage: a file, the run folder or a folder inside it, or any
  training run's folder (it holds checkpoints/ or metrics.jsonl; config.json would be replaced). A folder
  a previous export wrote is fine (its files are rewritten)."""
  out, run = os.path.realpath(out_dir), os.path.realpath(workdir)
  if os.path.commonpath([out, run]) == run:
    where = "is the run folder --workdir itself" if out == run else f"lies inside the run folder --workdir={workdir!r}"
    raise ConfigError("--out", out_dir, f"{where}; export would overwrite its config.json; choose a new folder")
  need_output_folder("--out", out_dir)


def export_run(workdir: str, out_dir: str, step: int | None = None) -> dict:
  """`nextlat export-hf`: the trunk of `workdir`'s checkpoint as an HF Llama folder; returns a summary."""
  check_out_dir(workdir, out_dir)  # before the (slow) load and before anything is written
  run = load_run(workdir, step)
  trunk = hf_config.llama_trunk(run)
  files = {}
  if run.tokenizer is not None:
    files = hf_tokenizer.tokenizer_files(run.tokenizer, model_max_length=run.row_len - 1,
                                         gpt2_path=run.config.data.get("tokenizer_path", "") or "")
  # positions 0..T occur in rows of T + 1 tokens (a row's first token continues its document at position 1)
  save_hf(trunk, run.cfg, out_dir, max_position_embeddings=run.row_len, eos_token_id=run.eos_id, files=files)
  return {"step": run.step, "out": os.path.abspath(out_dir), "files": sorted(os.listdir(out_dir))}


def read_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of HF_DIR/model.safetensors (or the shards its index lists) as numpy arrays."""
  load_file = _safetensors().load_file
  index = os.path.join(hf_dir, WEIGHTS_INDEX)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise ValueError(f"--hf_dir={hf_dir!r}: no {WEIGHTS} or {WEIGHTS_INDEX} (only safetensors are read)")
  sd: dict[str, np.ndarray] = {}
  for name in files:
    sd.update(load_file(os.path.join(hf_dir, name)))
  return sd


def load_hf(hf_dir: str, *, scan_layers: bool = True, param_dtype: str = "float32") -> tuple[dict, ModelConfig, dict]:
  """(trunk params as numpy in the cfg layout, the ModelConfig, the config.json dict) of an HF Llama folder."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"--hf_dir={hf_dir!r}: config.json not found")
  with open(path, encoding="utf-8") as f:
    hf = json.load(f)
  cfg = hf_config.model_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
  return hf_llama.from_hf_llama_state_dict(read_state_dict(hf_dir), cfg), cfg, hf


def write_init_checkpoint(config: ml_collections.ConfigDict, hf_dir: str, out: str) -> dict:
  """`nextlat import-hf`: OUT/checkpoints/0, a step-0 train state of `config` whose trunk is the HF model."""
  import orbax.checkpoint as ocp

  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(data=-1, fsdp=1, tensor=1)  # this machine's devices; the checkpoint restores onto any mesh
  config, _ = preflight.resolve(config)
  if config.objective.name not in hf_config.TRUNK_OBJECTIVES:
    raise ValueError(f"objective.name={config.objective.name!r}: import-hf fills a plain trunk "
                     f"(supported: {hf_config.TRUNK_OBJECTIVES})")
  cfg = ModelConfig.from_config(config.model)
  trunk_np, hf_cfg, _ = load_hf(hf_dir, scan_layers=cfg.scan_layers, param_dtype=cfg.param_dtype)
  hf_config.check_model_matches(config.model, hf_cfg)
  ckpt_dir = os.path.join(out, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"--out={out!r}: {ckpt_dir} is not empty; choose a new folder")
  setup = step_lib.build(config, make_mesh(config.mesh))  # a full train state: the optimizer's too
  state = setup.init(jax.random.PRNGKey(int(config.seed)))
  want = jax.tree.map(lambda a: (a.shape, a.dtype), state.params["trunk"])
  got = jax.tree.map(lambda a: (a.shape, a.dtype), trunk_np)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ValueError(f"import-hf: the HF trunk does not match objective {config.objective.name!r}'s trunk")
  shardings = setup.state_shardings.params
  params = {**state.params, "trunk": jax.device_put(trunk_np, shardings["trunk"])}
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
  state = state.replace(params=params, opt_state=opt_state)
  mgr = checkpoint.manager(ckpt_dir, config.checkpoint)
  mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                      opt_state=ocp.args.StandardSave(checkpoint.rest_of_state(state)),
                                      config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
  mgr.wait_until_finished()
  mgr.close()
  return {"out": os.path.abspath(out), "step": 0, "objective": config.objective.name,
          "trunk_parameters": int(sum(a.size for a in jax.tree.leaves(trunk_np)))}
