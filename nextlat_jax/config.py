"""Shared config defaults and validation: every user error names the key and the value."""
from __future__ import annotations

import re

import ml_collections

from nextlat_jax import objectives
from nextlat_jax.models.transformer import DTYPES, REMAT_POLICIES
from nextlat_jax.parallel.mesh import MESH_AXES, mesh_shape
from nextlat_jax.parallel.sharding import DEFAULT_RULES, logical_rules
from nextlat_jax.train.optimizer import (
  MUON_ADAM_PATTERNS,
  OPTIMIZERS,
  SCHEDULES,
  muon_available,
)


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the key and the value."""

  def __init__(self, key: str, value: object, why: str):
    super().__init__(f"config error: {key}={value!r}: {why}")
    self.key, self.value = key, value


def parse_preset(arg: str | None, where: str, option: str, option_help: str
                 ) -> tuple[str, re.Match | None, bool]:
  """A task config's argument "OBJECTIVE,OPTION,tiny" (each part optional, any order, comma-separated):
  (objective name, default "nextlat"; the match of the last part that fully matches the regex `option`,
  or None; whether "tiny" was given). Anything else raises ValueError naming `where` and the part."""
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


def base_config() -> ml_collections.ConfigDict:
  """Defaults every experiment config starts from (values not in the paper are marked)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # not specified by the paper for most tasks
  c.steps = 1000
  c.batch_size = 32  # global rows per step
  c.microbatches = 1  # gradient accumulation: the step runs batch_size / microbatches rows at a time
  c.log_every = 10
  c.eval_every = 200  # 0 disables held-out evaluation
  c.eval_steps = 4  # held-out batches per evaluation

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: take it from the dataset
      d_model=384, n_layer=6, n_head=6,
      ffn_width=0,  # 0: 128 * round(8D/3/128) as in the reference
      rope_base=10000.0, norm_eps=1e-5, init_std=0.02,
      scan_layers=True, remat="none",  # none | full | dots | dots_no_batch
      dtype="float32", param_dtype="float32",
      attention_impl=ml_collections.config_dict.placeholder(str),  # None: XLA's choice; "xla" | "cudnn"
  ))
  c.dynamics = ml_collections.ConfigDict(dict(
      kind="mlp",  # ablation (docs/research.md): "mlp" (the paper) | "resmlp" | "gru" | "attn"
      hidden=768,  # H_psi: every kind's hidden width (attn: its MLP)
      layers=2,  # resmlp: residual GEGLU blocks (not in the paper)
      window=4,  # attn: the chain's last k predicted latents attended to (not in the paper)
  ))
  c.objective = ml_collections.ConfigDict(dict(
      name="nextlat", horizon=1, lambda_next_h=1.0, lambda_kl=1.0,
      eos_mask="transition",  # reference; "chain" masks every step at or after an EOS crossing
      # NextLat ablation switches (docs/research.md); the paper's choice is the default.
      next_h_stop_gradient=True,  # stop-gradient on the next-h target h_{t+i}; False: it trains the trunk
      kl_frozen_head=True,  # stop-gradient on W_head in the token-space term's logits; False: it trains the head
      token_loss="kl",  # term on head(ĥ): "kl" (teacher h_{t+i}) | "ce" (true x_{t+i+1}) | "none"
      next_h_loss="smooth_l1",  # "smooth_l1" | "mse" | "cosine" (1 - cos per position; losses.py)
      remat_rollout=False,  # jax.checkpoint each rollout step (saves memory at large vocabularies)
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
      name="adamw", lr=3e-4, schedule="constant", warmup_steps=0, decay_steps=0,
      final_lr_fraction=0.0,  # cosine only
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,  # grad_clip 0 disables clipping
      # name="muon": Muon on the hidden matrices, AdamW (the keys above) on the rest (docs/research.md).
      # Not specified by the paper (App. E tried Muon without settings): defaults of optax.contrib.muon /
      # Keller Jordan's Muon.
      muon_lr=0.02,  # peak LR of the Muon matrices; follows optimizer.schedule like lr
      muon_momentum=0.95, muon_nesterov=True, muon_ns_steps=5,
      muon_weight_decay=ml_collections.config_dict.placeholder(float),  # None: optimizer.weight_decay
      muon_consistent_rms=ml_collections.config_dict.placeholder(float),  # None: sqrt(max(1, out/in)) scaling
      muon_split_fused=True,  # q/k/v and gate/up kernels as separate matrices
      muon_adam_patterns=MUON_ADAM_PATTERNS,  # regexes on param paths that stay on AdamW
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=DEFAULT_RULES))
  c.peak_flops_per_device = 0.0  # for MFU; 0: from the table of known chips (none for CPUs)
  c.nan_guard = "skip"  # a NaN/inf loss or gradient: "skip" the update (counted) or "stop" the run
  c.train = ml_collections.ConfigDict(dict(
      # Before step 0 on a multi-device mesh: a tiny model with this run's mesh, rules, objective, rows
      # per shard and row length compares sharded and single-device gradients (parallel/canary.py).
      sharding_canary=True,
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=0,  # save every N steps (and at the end, on SIGTERM); 0: no checkpoints
      keep=3,  # keep the last K ...
      keep_period=0,  # ... plus every M-th step for good (0: none)
      async_save=True,
      snapshot_on_device=True,  # copy the state on device and save from a background thread
      restore_from=ml_collections.config_dict.placeholder(str),  # start from another run's checkpoint
      # A workdir whose checkpoints are all unreadable stops the run; True moves them aside
      # (<step>.corrupt) and starts fresh instead. Incompatible checkpoints always stop it.
      allow_fresh_start=False,
  ))
  return c


def validate(c: ml_collections.ConfigDict, num_devices: int, data_vocab: int | None = None) -> None:
  """Raises ConfigError for the first bad value; call before building or compiling anything."""
  def need(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
      raise ConfigError(key, value, why)

  m, o, opt = c.model, c.objective, c.optimizer
  for key in ("d_model", "n_layer", "n_head"):
    need(int(m[key]) >= 1, f"model.{key}", m[key], "must be >= 1")
  need(m.d_model % m.n_head == 0, "model.d_model", m.d_model,
       f"must be divisible by model.n_head={m.n_head}")
  need((m.d_model // m.n_head) % 2 == 0, "model.n_head", m.n_head, "head_dim must be even for RoPE")
  need(m.vocab_size >= 1, "model.vocab_size", m.vocab_size, "must be >= 1")
  if data_vocab is not None:
    need(m.vocab_size >= data_vocab, "model.vocab_size", m.vocab_size,
         f"smaller than the dataset's vocabulary ({data_vocab})")
  need(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"must be one of {REMAT_POLICIES}")
  for key in ("dtype", "param_dtype"):
    need(m[key] in DTYPES, f"model.{key}", m[key], f"must be one of {tuple(DTYPES)}")
  need(m.attention_impl in (None, "xla", "cudnn"), "model.attention_impl", m.attention_impl,
       "must be None, 'xla' or 'cudnn'")

  need(o.name in objectives.names(), "objective.name", o.name,
       f"unknown objective (known: {', '.join(objectives.names())})")
  if o.name == "nextlat":
    need(int(o.horizon) >= 1, "objective.horizon", o.horizon, "must be >= 1 for nextlat")
    need(o.eos_mask in ("transition", "chain"), "objective.eos_mask", o.eos_mask,
         "must be 'transition' or 'chain'")
    need(c.dynamics.kind in ("mlp", "resmlp", "gru", "attn"), "dynamics.kind", c.dynamics.kind,
         "unknown (known: mlp, resmlp, gru, attn)")
    need(int(c.dynamics.get("layers", 2)) >= 1, "dynamics.layers", c.dynamics.get("layers"), "must be >= 1")
    need(int(c.dynamics.get("window", 4)) >= 1, "dynamics.window", c.dynamics.get("window"), "must be >= 1")
    for key in ("next_h_stop_gradient", "kl_frozen_head"):
      need(isinstance(o.get(key, True), bool), f"objective.{key}", o.get(key), "must be True or False")
    need(o.get("token_loss", "kl") in ("kl", "ce", "none"), "objective.token_loss", o.get("token_loss"),
         "must be 'kl', 'ce' or 'none'")
    need(o.get("next_h_loss", "smooth_l1") in ("smooth_l1", "mse", "cosine"), "objective.next_h_loss",
         o.get("next_h_loss"), "must be 'smooth_l1', 'mse' or 'cosine'")
    need(int(c.dynamics.hidden) >= 1, "dynamics.hidden", c.dynamics.hidden, "must be >= 1")
    for key in ("lambda_next_h", "lambda_kl"):
      need(float(o[key]) >= 0, f"objective.{key}", o[key], "must be >= 0")

  if o.name in ("mtp", "mtp_deepseek", "jtp"):
    need(int(o.horizon) >= 1, "objective.horizon", o.horizon, f"must be >= 1 for {o.name}")
    need(float(o.lambda_mtp) >= 0, "objective.lambda_mtp", o.lambda_mtp, "must be >= 0")
  if o.name == "mtp":
    need(int(m.n_layer) >= 2, "model.n_layer", m.n_layer, "must be >= 2 for mtp (trunk of n_layer - 1 blocks)")
    need(o.mtp_eos_mask in ("reference", "intended"), "objective.mtp_eos_mask", o.mtp_eos_mask,
         "must be 'reference' or 'intended'")
  if o.name in ("mtp", "jtp"):
    reps = ("trunk", "head0") if o.name == "mtp" else ("trunk", "combine")
    need(o.representation in reps, "objective.representation", o.representation,
         f"must be one of {reps} for {o.name}")
  if o.name == "jtp":
    need(m.d_model % min(4, m.n_head) == 0, "model.d_model", m.d_model,
         f"must be divisible by jtp's min(4, n_head)={min(4, m.n_head)} Fetch heads")
  if o.name == "mtp_deepseek":
    need(o.deepseek_concat in ("embedding_first", "hidden_first"), "objective.deepseek_concat",
         o.deepseek_concat, "must be 'embedding_first' or 'hidden_first'")
  if o.name == "bst":
    need(int(o.bst_min_gap) >= 1, "objective.bst_min_gap", o.bst_min_gap, "must be >= 1")
    need(int(o.bst_max_gap) == -1 or int(o.bst_max_gap) > int(o.bst_min_gap), "objective.bst_max_gap",
         o.bst_max_gap, f"must be -1 (no limit) or > bst_min_gap={o.bst_min_gap}")
    need(0 < float(o.bst_pair_fraction) <= 1, "objective.bst_pair_fraction", o.bst_pair_fraction,
         "must be in (0, 1]")
    need(int(o.bst_pair_chunk) >= 1, "objective.bst_pair_chunk", o.bst_pair_chunk, "must be >= 1")
    need(o.bst_normalize in ("row", "pair"), "objective.bst_normalize", o.bst_normalize, "must be 'row' or 'pair'")

  need(opt.name in OPTIMIZERS, "optimizer.name", opt.name, f"unknown (known: {', '.join(OPTIMIZERS)})")
  if opt.name == "muon":
    need(muon_available(), "optimizer.name", opt.name, "needs optax >= 0.2.7 (Muon weight_dimension_numbers)")
    need(float(opt.muon_lr) > 0, "optimizer.muon_lr", opt.muon_lr, "must be > 0")
    need(0 <= float(opt.muon_momentum) < 1, "optimizer.muon_momentum", opt.muon_momentum, "must be in [0, 1)")
    need(int(opt.muon_ns_steps) >= 1, "optimizer.muon_ns_steps", opt.muon_ns_steps, "must be >= 1")
    need(opt.muon_weight_decay is None or float(opt.muon_weight_decay) >= 0, "optimizer.muon_weight_decay",
         opt.muon_weight_decay, "must be None (= optimizer.weight_decay) or >= 0")
    need(opt.muon_consistent_rms is None or float(opt.muon_consistent_rms) > 0, "optimizer.muon_consistent_rms",
         opt.muon_consistent_rms, "must be None (width scaling) or > 0")
    pats = opt.muon_adam_patterns
    need(isinstance(pats, (tuple, list)) and all(isinstance(p, str) for p in pats), "optimizer.muon_adam_patterns",
         pats, "must be a tuple of regex strings")
    for pat in pats:
      try:
        re.compile(pat)
      except re.error as e:
        raise ConfigError("optimizer.muon_adam_patterns", pat, f"not a regex: {e}") from None
  need(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"must be one of {SCHEDULES}")
  need(float(opt.lr) > 0, "optimizer.lr", opt.lr, "must be > 0")
  need(int(opt.warmup_steps) >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
  if opt.schedule == "wsd":
    need(0 <= int(opt.decay_steps) <= int(c.steps) - int(opt.warmup_steps), "optimizer.decay_steps",
         opt.decay_steps, f"must be in [0, steps - warmup_steps] = [0, {c.steps - opt.warmup_steps}]")

  need(int(c.steps) >= 1, "steps", c.steps, "must be >= 1")
  need(c.nan_guard in ("skip", "stop"), "nan_guard", c.nan_guard, "must be 'skip' or 'stop'")
  for key in ("every", "keep_period"):
    need(int(c.checkpoint[key]) >= 0, f"checkpoint.{key}", c.checkpoint[key], "must be >= 0")
  need(int(c.checkpoint.keep) >= 1, "checkpoint.keep", c.checkpoint.keep, "must be >= 1")
  need(int(c.log_every) >= 1, "log_every", c.log_every, "must be >= 1")
  need(int(c.eval_every) >= 0, "eval_every", c.eval_every, "must be >= 0")
  sizes = {a: c.mesh[a] for a in MESH_AXES}
  try:
    shape = mesh_shape(c.mesh, num_devices)
  except ValueError as e:
    raise ConfigError("mesh", sizes, str(e).split(": ", 1)[-1]) from None
  need(all(s >= 1 for s in shape), "mesh", sizes, "axis sizes must be >= 1 (or one -1)")
  need(shape[0] * shape[1] * shape[2] == num_devices, "mesh", sizes,
       f"product {shape[0] * shape[1] * shape[2]} != device count {num_devices}")
  dp = shape[0] * shape[1]
  need(int(c.batch_size) >= 1 and c.batch_size % dp == 0, "batch_size", c.batch_size,
       f"must be divisible by the data-parallel size mesh.data*mesh.fsdp={dp}")
  k = int(c.get("microbatches", 1))
  need(k >= 1 and c.batch_size % (k * dp) == 0, "microbatches", k,
       f"batch_size={c.batch_size} must be divisible by microbatches * data-parallel size ({dp})")
  # XLA's SPMD partitioner (jax 0.10.2 .. 0.12.0, Shardy and GSPMD) permutes the batch rows of a cotangent
  # and never permutes them back when the batch is tiled (data, fsdp) and weights (fsdp, tensor) on a mesh
  # with all three axes > 1: wrong gradients (docs/sharding.md). DEFAULT_RULES tile it (fsdp, data).
  batch_rule = dict(logical_rules(c)).get("activation_batch")
  batch_axes = (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule or ())
  need(not (min(shape) > 1 and {"data", "fsdp"} <= set(batch_axes)
            and batch_axes.index("data") < batch_axes.index("fsdp")), "mesh.rules", f"activation_batch={batch_rule}",
       f"batch over (data, fsdp) on mesh {dict(zip(MESH_AXES, shape))} triggers an XLA SPMD miscompile "
       "(wrong gradients, docs/sharding.md); use ('fsdp', 'data') as in DEFAULT_RULES")
  fsdp, tensor = shape[1], shape[2]
  ffn = int(m.ffn_width) or 128 * round(8 * m.d_model / 3 / 128)
  for key, size, axis, n in (("model.n_head", m.n_head, "mesh.tensor", tensor),
                             ("model.vocab_size", m.vocab_size, "mesh.tensor", tensor),
                             ("model.ffn_width (SwiGLU width)", ffn, "mesh.tensor", tensor),
                             ("model.d_model", m.d_model, "mesh.fsdp", fsdp)):
    need(size % n == 0, key, size, f"must be divisible by {axis}={n} (it is sharded over that axis)")
  if o.name == "nextlat":
    H = int(c.dynamics.hidden)
    need(H % tensor == 0 and H % fsdp == 0, "dynamics.hidden", H,
         f"must be divisible by mesh.tensor={tensor} and mesh.fsdp={fsdp}")
