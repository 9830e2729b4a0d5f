"""The config in one place: `base_config()` holds every default, `from_saved` reads a checkpoint's config
over it, `validate` runs every check before anything is built or compiled.

The checks live beside what they check (nextlat_jax.models.checks, the objective modules,
nextlat_jax.train.optimizer, nextlat_jax.parallel.sharding) and raise `ConfigError` (nextlat_jax.errors):
one line naming the key and the value. This module imports them only inside `validate`, so nothing here
runs at import time beyond ml_collections.
"""
from __future__ import annotations

import importlib.util
import os
import re

import ml_collections

from nextlat_jax.errors import ConfigError, need

__all__ = ["ConfigError", "base_config", "from_saved", "load_config_file", "parse_preset", "validate"]

# the repo's configs/ (beside the package in a source checkout or an editable install)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse_preset(arg: str | None, where: str, option: str, option_help: str
                 ) -> tuple[str, re.Match | None, bool]:
  """A task config's argument "OBJECTIVE,OPTION,tiny" (each part optional, any order, comma-separated):
  (objective name, default "nextlat"; the match of the last part that fully matches the regex `option`,
  or None; whether "tiny" was given). Anything else raises ValueError naming `where` and the part."""
  from nextlat_jax import objectives
  names = objectives.names()
  name, match, tiny = "nextlat", None, False
  for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    m = re.fullmatch(option, part)
    if part in names:
      name = part
    elif part == "tiny":
      tiny = True
    elif m:
      match = m
    else:
      raise ValueError(f"{where} argument part {part!r}: expected an objective {names}, {option_help} or 'tiny'")
  return name, match, tiny


def user_file_error(error: BaseException, path: str) -> str | None:
  """'LINE N: Type: message' when `error` was raised by the Python file `path` itself (a syntax error in
  it, or an exception in one of its frames), else None: the file's mistake in one line, not a traceback."""
  def same(f: str | None) -> bool:
    return bool(f) and os.path.abspath(f) == os.path.abspath(path)
  line = None
  if isinstance(error, SyntaxError) and same(error.filename):
    line = error.lineno
  tb = error.__traceback__
  while tb is not None:
    if same(tb.tb_frame.f_code.co_filename):
      line = tb.tb_lineno  # the innermost frame in the file
    tb = tb.tb_next
  if line is None:
    return None
  message = (error.msg if isinstance(error, SyntaxError) else str(error)).strip().splitlines() or [""]
  return f"line {line}: {type(error).__name__}: {message[0]}"


def call_user_file(path: str, module_name: str, function: str, *args):
  """`function(*args)` of the Python file `path`; the file's own mistakes (a syntax or import error, a
  missing `function`, an exception inside it) as ConfigError('file', path, why)."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError("file", path, "not found")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
      raise ConfigError("file", path, f"defines no {function}()")
    return getattr(module, function)(*args)
  except ConfigError:
    raise
  except Exception as e:  # the user's file: re-raised unless the error is its own (then one line)
    why = user_file_error(e, path)
    if why is None:
      raise
    raise ConfigError("file", path, why) from None


def load_config_file(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of configs/NAME.py (or of the file NAME when it ends in .py), as
  `--config=configs/NAME.py:ARG` builds it, for scripts and tests that build configs in Python."""
  path = name if name.endswith(".py") else os.path.join(CONFIGS_DIR, f"{name}.py")
  if not os.path.isfile(path):
    raise ConfigError("config file", path, "not found")
  module_name = "nextlat_config_" + os.path.splitext(os.path.basename(path))[0]
  config = call_user_file(path, module_name, "get_config", *([arg] if arg is not None else []))
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError("file", path, f"get_config() returned {type(config).__name__}, not a ConfigDict")
  return config


def base_config() -> ml_collections.ConfigDict:
  """Every default, the one place they live: experiment configs (configs/*.py) start from it and
  override; consumers read the keys directly. Values not in the paper are marked."""
  from nextlat_jax.parallel.sharding import DEFAULT_RULES
  from nextlat_jax.train.optimizer import MUON_ADAM_PATTERNS
  c = ml_collections.ConfigDict()
  c.seed = 0  # not specified by the paper for most tasks
  c.steps = 1000  # optimizer updates
  c.batch_size = 32  # global rows per step
  c.microbatches = 1  # gradient accumulation: the step runs batch_size / microbatches rows at a time
  c.log_every = 10  # steps between metric lines (metrics.jsonl, TensorBoard, the progress bar)
  c.eval_every = 200  # 0 disables held-out evaluation
  c.eval_steps = 4  # held-out batches per evaluation
  c.eval_task = ml_collections.config_dict.placeholder(str)  # `nextlat eval`'s task metrics; None: data.name

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: take it from the dataset
      d_model=384, n_layer=6, n_head=6,  # width, blocks, attention heads (head_dim = d_model / n_head)
      ffn_width=0,  # 0: 128 * round(8D/3/128) as in the reference
      rope_base=10000.0, norm_eps=1e-5, init_std=0.02,  # RoPE base, RMSNorm epsilon, N(0, std) init
      scan_layers=True,  # the blocks as one jax.lax.scan (one compiled block) or unrolled
      remat="none",  # none | full | dots | dots_no_batch
      dtype="float32", param_dtype="float32",  # compute / parameter dtypes: float32 | bfloat16
      # None: jax.nn.dot_product_attention picks (dense mask) | "xla" | "cudnn" | "flash" (Pallas kernel from
      # segment ids: Triton on GPU, splash on TPU, interpret mode on CPU) | "auto" (flash on GPU/TPU, xla on
      # CPU). Decoding's slot masks always take the dense path (nextlat_jax/models/attention.py).
      attention_impl=ml_collections.config_dict.placeholder(str),
  ))
  c.dynamics = ml_collections.ConfigDict(dict(
      kind="mlp",  # ablation (docs/research.md): "mlp" (the paper) | "resmlp" | "gru" | "attn"
      hidden=768,  # H_psi: every kind's hidden width (attn: its MLP)
      layers=2,  # resmlp: residual GEGLU blocks (not in the paper)
      window=4,  # attn: the chain's last k predicted latents attended to (not in the paper)
  ))
  c.objective = ml_collections.ConfigDict(dict(
      name="nextlat",  # gpt | nextlat | mtp | mtp_deepseek | jtp | bst (nextlat_jax.objectives)
      horizon=1,  # d: rollout steps (nextlat), extra heads / slots / modules (mtp, jtp, mtp_deepseek)
      lambda_next_h=1.0, lambda_kl=1.0,  # nextlat: weights of the next-latent and token-space terms
      eos_mask="transition",  # reference; "chain" masks every step at or after an EOS crossing
      # NextLat ablation switches (docs/research.md); the paper's choice is the default.
      next_h_stop_gradient=True,  # stop-gradient on the next-h target h_{t+i}; False: it trains the trunk
      kl_frozen_head=True,  # stop-gradient on W_head in the token-space term's logits; False: it trains the head
      token_loss="kl",  # term on head(ĥ): "kl" (teacher h_{t+i}) | "ce" (true x_{t+i+1}) | "none"
      next_h_loss="smooth_l1",  # "smooth_l1" | "mse" | "cosine" (1 - cos per position; losses.py)
      remat_rollout=False,  # jax.checkpoint each rollout step's dynamics and next-h term (memory)
      # Positions (of every row) per chunk of the vocabulary-wide losses (CE, KL; objectives/vocab_losses.py):
      # no float32 (B, T, V) array is kept for the backward pass; 0: whole rows at once (the reference).
      vocab_chunk=32,
      # Baselines (BASELINES.md; docs/baselines.md). MTP / JTP / mtp_deepseek also read horizon and
      # remat_rollout (then: checkpoint each extra head / slot / module).
      lambda_mtp=1.0,  # mtp, jtp, mtp_deepseek aux. weight: FineWeb-Edu's untuned 1.0 (per task: not reported)
      mtp_eos_mask="reference",  # mtp: "reference" (the code's rule) | "intended" (no EOS before the target)
      representation="trunk",  # state for rank/probe metrics: mtp "trunk" | "head0"; jtp "trunk" | "combine"
      deepseek_concat="embedding_first",  # mtp_deepseek: public implementations; "hidden_first": the report
      deepseek_final_norm=True,  # mtp_deepseek: per-module RMSNorm before the shared head (public impls)
      bst_min_gap=1, bst_max_gap=-1,  # bst: pair gaps k in [min, max); -1: no limit (reference defaults)
      bst_pair_fraction=1.0,  # bst: < 1 keeps a per-row budget of pairs (EOS-touching first), not specified
      bst_pair_chunk=2048,  # bst: pairs per row per rematerialised chunk (memory only)
      bst_normalize="row",  # bst: "row" (mean per row, then over rows; reference) | "pair"; not specified
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",  # adamw | muon
      lr=3e-4,  # peak learning rate
      schedule="constant", warmup_steps=0,  # constant | wsd | cosine, each after a linear warm-up
      decay_steps=0,  # wsd only: the last decay_steps updates decay linearly to 0
      final_lr_fraction=0.0,  # cosine only
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,  # AdamW (weight decay on matrices only)
      grad_clip=1.0,  # global-norm clipping; 0 disables it
      # name="muon": Muon on the hidden matrices, AdamW (the keys above) on the rest (docs/research.md).
      # Not specified by the paper (App. E tried Muon without settings): defaults of optax.contrib.muon /
      # Keller Jordan's Muon.
      muon_lr=0.02,  # peak LR of the Muon matrices; follows optimizer.schedule like lr
      muon_momentum=0.95, muon_nesterov=True, muon_ns_steps=5,  # momentum, Nesterov, Newton-Schulz steps
      muon_weight_decay=ml_collections.config_dict.placeholder(float),  # None: optimizer.weight_decay
      muon_consistent_rms=ml_collections.config_dict.placeholder(float),  # None: sqrt(max(1, out/in)) scaling
      muon_split_fused=True,  # q/k/v and gate/up kernels as separate matrices
      muon_adam_patterns=MUON_ADAM_PATTERNS,  # regexes on param paths that stay on AdamW
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,  # axis sizes; one may be -1: the remaining devices
      rules=DEFAULT_RULES,  # logical axis name -> mesh axes (nextlat_jax.parallel.sharding)
  ))
  c.peak_flops_per_device = 0.0  # for MFU; 0: from the table of known chips (none for CPUs)
  c.nan_guard = "skip"  # a NaN/inf loss or gradient: "skip" the update (counted) or "stop" the run
  c.train = ml_collections.ConfigDict(dict(
      # Before step 0 on a multi-device mesh: a tiny model with this run's mesh, rules, objective, rows
      # per shard and row length compares sharded and single-device gradients (parallel/canary.py).
      sharding_canary=True,
      # A jax.profiler trace of the updates start_step .. start_step + steps - 1 (0-based, the state's
      # step before each update) under <workdir>/profile (per process: profile/process_<i>); -1: off.
      profile=dict(start_step=-1, steps=3),
      # The persistent XLA compilation cache in this folder (set before the first compile); None: off.
      # Off by default: on jax 0.10.2 an executable of the sharded Muon step loaded from it aborts
      # XLA:CPU (docs/design.md, "Measurements"); fine on GPU / TPU.
      compilation_cache_dir=ml_collections.config_dict.placeholder(str),
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=0,  # save every N steps (and at the end, on SIGTERM); 0: no checkpoints
      keep=3,  # keep the last K ...
      keep_period=0,  # ... plus every M-th step for good (0: none)
      async_save=True,  # save in the background while training continues
      snapshot_on_device=True,  # copy the state on device and save from a background thread
      restore_from=ml_collections.config_dict.placeholder(str),  # start from another run's checkpoint
      # A workdir whose checkpoints are all unreadable stops the run; True moves them aside
      # (<step>.corrupt) and starts fresh instead. Incompatible checkpoints always stop it.
      allow_fresh_start=False,
  ))
  return c


def _merge(base: dict, saved: dict) -> dict:
  """`saved` over `base`, recursively: keys only in `base` keep its value, every key of `saved` wins."""
  out = dict(base)
  for key, value in saved.items():
    out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
  return out


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (the JSON dict stored with its checkpoints) over base_config(), so a run saved
  before a key existed reads that key's default (the value the code before it behaved as)."""
  return ml_collections.ConfigDict(_merge(base_config().to_dict(), saved))


def _validate_run(c: ml_collections.ConfigDict) -> None:
  """The run's own keys: steps, logging, evaluation, checkpoints, the NaN guard."""
  need(int(c.steps) >= 1, "steps", c.steps, "must be >= 1")
  need(int(c.batch_size) >= 1, "batch_size", c.batch_size, "must be >= 1")
  need(int(c.microbatches) >= 1, "microbatches", c.microbatches, "must be >= 1")
  need(c.nan_guard in ("skip", "stop"), "nan_guard", c.nan_guard, "must be 'skip' or 'stop'")
  for key in ("every", "keep_period"):
    need(int(c.checkpoint[key]) >= 0, f"checkpoint.{key}", c.checkpoint[key], "must be >= 0")
  need(int(c.checkpoint.keep) >= 1, "checkpoint.keep", c.checkpoint.keep, "must be >= 1")
  need(int(c.log_every) >= 1, "log_every", c.log_every, "must be >= 1")
  need(int(c.eval_every) >= 0, "eval_every", c.eval_every, "must be >= 0")


def validate(c: ml_collections.ConfigDict, num_devices: int, data_vocab: int | None = None) -> None:
  """Raises ConfigError for the first bad value; call before building or compiling anything. The checks,
  in order: the trunk, the objective (and its dynamics), the optimizer, the run's keys, the mesh and the
  batch over it, then the trunk's and the objective's widths on the mesh."""
  from nextlat_jax import objectives
  from nextlat_jax.models import checks as model_checks
  from nextlat_jax.parallel import sharding
  from nextlat_jax.train import optimizer, profiling
  model_checks.validate(c, data_vocab)
  objectives.validate(c)
  optimizer.validate(c)
  _validate_run(c)
  profiling.validate(c)
  _, fsdp, tensor = sharding.validate(c, num_devices)
  model_checks.validate_sharding(c, fsdp, tensor)
  objectives.validate_sharding(c, fsdp, tensor)
