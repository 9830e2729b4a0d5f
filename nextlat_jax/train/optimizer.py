"""optax optimizers (AdamW; Muon + AdamW) and learning-rate schedules (constant / WSD / cosine, each with
linear warm-up).

`optimizer.name = "muon"` orthogonalises the updates of the hidden matrices (attention qkv / out, MLP,
the middle layers of p_psi) with optax's Muon (`optax.contrib.scale_by_muon`: momentum, Nesterov,
Newton-Schulz quintic iteration) followed by optax's shape scaling, decoupled weight decay and the Muon
learning rate, exactly as `optax.contrib.muon` chains them (tests/test_muon.py checks the equality). Every
other parameter (embeddings, head, norms, biases, p_psi's first and last layers: `muon_adam_patterns`)
gets plain AdamW with the usual keys and the weight-decay mask. The paper tried Muon on FineWeb-Edu (App.
E) without giving settings; every Muon value here is a project default (docs/research.md, "Muon").

Which axes form the matrix (optax's MuonDimensionNumbers) is read from the logical axis names of the
params: `layers` (the scanned layer axis) is a batch axis, so each layer's matrix is orthogonalised on its
own; with `muon_split_fused`, unnamed axes of a kernel with >= 2 named axes (the q/k/v index of `qkv`, the
gate/up index of `mlp_in`) are batch axes too. Of the remaining axes, a kernel whose first one is `embed`
maps it (reduction) to the rest (output); any other kernel maps all but its last axis to its last axis.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import optax

from nextlat_jax.errors import ConfigError, need

SCHEDULES = ("constant", "wsd", "cosine")
OPTIMIZERS = ("adamw", "muon")
# Parameters (paths like "trunk/embed", "dynamics/fc1/kernel") that Muon leaves to AdamW, as regexes
# searched in the path; parameters with fewer than two matrix axes always go to AdamW.
MUON_ADAM_PATTERNS = (r"(^|/)embed$", r"(^|/)head$", r"^dynamics/fc1/", r"^dynamics/fc3/", r"bias")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # optax's (Keller Jordan's) quintic Newton-Schulz coefficients


def schedule(opt_cfg: Any, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """Learning rate at update k (k = 0 is the first update), peaking at `peak` (default opt_cfg.lr).

  Warm-up multiplies the peak by k / warmup_steps, so the first update uses LR 0 as in the reference.
  WSD decays linearly to exactly 0 at k = total_steps over the last `decay_steps` updates.
  """
  lr, warmup = float(opt_cfg.lr if peak is None else peak), int(opt_cfg.warmup_steps)
  name = opt_cfg.schedule
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "wsd":
    decay = int(opt_cfg.decay_steps)
    stable = max(total_steps - warmup - decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [stable])
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=float(opt_cfg.final_lr_fraction))
  else:
    raise ValueError(f"optimizer.schedule={name!r}: unknown (known: {', '.join(SCHEDULES)})")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def param_path(path: tuple) -> str:
  """A key path as "trunk/blocks/qkv/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def matrix_axes(names: tuple, split_fused: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """(reduction axes, output axes) of a kernel with these logical axis names; None if not a matrix."""
  named = [i for i, n in enumerate(names) if n is not None and n != "layers"]
  batch = {i for i, n in enumerate(names) if n == "layers"}
  if split_fused and len(named) >= 2:
    batch |= {i for i, n in enumerate(names) if n is None}
  rest = [i for i in range(len(names)) if i not in batch]
  if len(rest) < 2:
    return None
  if names[rest[0]] == "embed":
    return (rest[0],), tuple(rest[1:])
  return tuple(rest[:-1]), (rest[-1],)


def muon_dimension_numbers(abstract_boxed_params: Any, patterns: tuple[str, ...] = MUON_ADAM_PATTERNS,
                           split_fused: bool = True) -> Any:
  """Per parameter: optax MuonDimensionNumbers (Muon) or None (AdamW). Unboxed parameters have no axis
  names: 2-D ones are (in, out) matrices, others go to AdamW."""
  regexes = [re.compile(p) for p in patterns]

  def one(path, p):
    value = p.value if _is_box(p) else p
    names = tuple(p.names) if _is_box(p) else ((None, None) if value.ndim == 2 else (None,) * value.ndim)
    if any(r.search(param_path(path)) for r in regexes) or value.ndim < 2:
      return None
    axes = matrix_axes(names, split_fused) if _is_box(p) else ((0,), (1,)) if value.ndim == 2 else None
    return None if axes is None else optax.contrib.MuonDimensionNumbers(*axes)
  return jax.tree_util.tree_map_with_path(one, abstract_boxed_params, is_leaf=_is_box)


def _is_dim_num(x: Any) -> bool:
  return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


def _fans(x: jax.Array, dim: Any) -> tuple[int, int]:
  axes = lambda a: (a,) if isinstance(a, int) else tuple(a)
  return (math.prod(x.shape[i] for i in axes(dim.reduction_axis)),
          math.prod(x.shape[i] for i in axes(dim.output_axis)))


def scale_by_shape(dim_nums_fn: Any, consistent_rms: float | None = None) -> optax.GradientTransformation:
  """optax.contrib.muon's shape scaling: sqrt(max(1, fan_out / fan_in)) (Keller Jordan), or
  consistent_rms * sqrt(max(fan_in, fan_out)) (Liu et al. 2025, "Muon is scalable")."""
  def scale(x, dim):
    fan_in, fan_out = _fans(x, dim)
    if consistent_rms is None:
      return math.sqrt(max(1.0, fan_out / fan_in)) * x
    return math.sqrt(max(fan_in, fan_out)) * float(consistent_rms) * x

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, dim_nums_fn(updates), is_leaf=lambda x: x is None), state
  return optax.GradientTransformation(optax.init_empty_state, update)


def muon(learning_rate: optax.ScalarOrSchedule, dim_nums: Any, *, beta: float = 0.95, nesterov: bool = True,
         ns_steps: int = 5, eps: float = 1e-8, weight_decay: float = 0.0, decay_mask: Any = None,
         consistent_rms: float | None = None) -> optax.GradientTransformation:
  """optax.contrib.muon's Muon chain for parameters whose `dim_nums` entry is set (use it inside
  optax.partition: the other leaves arrive as optax.MaskedNode)."""
  def dim_nums_fn(updates):
    return jax.tree.map(lambda d, u: u if isinstance(u, optax.MaskedNode) else d, dim_nums, updates,
                        is_leaf=_is_dim_num)
  return optax.chain(
      optax.contrib.scale_by_muon(ns_coeffs=NS_COEFFS, ns_steps=ns_steps, beta=beta, eps=eps, nesterov=nesterov,
                                  weight_dimension_numbers=dim_nums_fn),
      scale_by_shape(dim_nums_fn, consistent_rms),
      optax.add_decayed_weights(weight_decay, decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _adamw(opt_cfg: Any, lr: optax.Schedule, decay_mask: Any) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                     weight_decay=float(opt_cfg.weight_decay), mask=decay_mask)


def make_optimizer(opt_cfg: Any, total_steps: int, decay_mask: Any, abstract_boxed_params: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW (weight decay where `decay_mask` is True), or Muon on the hidden
  matrices and AdamW on the rest. Muon reads the axis names of `abstract_boxed_params` (the boxed
  params from jax.eval_shape(objective.init)). Returns (transformation, AdamW LR schedule)."""
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt_cfg.name!r}: unknown (known: {', '.join(OPTIMIZERS)})")
  lr = schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip and float(opt_cfg.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
  if opt_cfg.name == "adamw":
    return optax.chain(*parts, _adamw(opt_cfg, lr, decay_mask)), lr
  if abstract_boxed_params is None:
    raise ValueError("optimizer.name='muon': make_optimizer needs the boxed abstract params")
  dim_nums = muon_dimension_numbers(abstract_boxed_params, tuple(opt_cfg.muon_adam_patterns),
                                    bool(opt_cfg.muon_split_fused))
  labels = jax.tree.map(lambda d: "adam" if d is None else "muon", dim_nums, is_leaf=_is_dim_num)
  wd = opt_cfg.muon_weight_decay
  rms = opt_cfg.muon_consistent_rms
  muon_tx = muon(schedule(opt_cfg, total_steps, peak=float(opt_cfg.muon_lr)), dim_nums,
                 beta=float(opt_cfg.muon_momentum), nesterov=bool(opt_cfg.muon_nesterov),
                 ns_steps=int(opt_cfg.muon_ns_steps), eps=float(opt_cfg.eps),
                 weight_decay=float(opt_cfg.weight_decay if wd is None else wd), decay_mask=decay_mask,
                 consistent_rms=None if rms is None else float(rms))
  parts.append(optax.partition({"muon": muon_tx, "adam": _adamw(opt_cfg, lr, decay_mask)}, labels))
  return optax.chain(*parts), lr


def muon_available() -> bool:
  """optax >= 0.2.7: scale_by_muon takes weight_dimension_numbers (stacked layers, fused kernels)."""
  import inspect
  return (hasattr(optax.contrib, "MuonDimensionNumbers")
          and "weight_dimension_numbers" in inspect.signature(optax.contrib.scale_by_muon).parameters)


def describe_routing(abstract_boxed_params: Any, opt_cfg: Any) -> dict[str, str]:
  """{param path: "muon (reduction axes -> output axes)" | "adamw"}: for logs and docs."""
  dim_nums = muon_dimension_numbers(abstract_boxed_params, tuple(opt_cfg.muon_adam_patterns),
                                    bool(opt_cfg.muon_split_fused))
  flat = jax.tree_util.tree_flatten_with_path(dim_nums, is_leaf=_is_dim_num)[0]
  return {param_path(p): "adamw" if d is None else f"muon {tuple(d.reduction_axis)} -> {tuple(d.output_axis)}"
          for p, d in flat}



def validate(config: Any) -> None:
  """config.optimizer (and optimizer.decay_steps against config.steps); raises ConfigError for the first
  bad value."""
  opt = config.optimizer
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
    need(0 <= int(opt.decay_steps) <= int(config.steps) - int(opt.warmup_steps), "optimizer.decay_steps",
         opt.decay_steps, f"must be in [0, steps - warmup_steps] = [0, {config.steps - opt.warmup_steps}]")
