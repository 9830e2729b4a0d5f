"""optax optimizer and learning-rate schedules (constant / WSD / cosine, each with linear warm-up)."""
from __future__ import annotations

from typing import Any

import optax

SCHEDULES = ("constant", "wsd", "cosine")


def schedule(opt_cfg: Any, total_steps: int) -> optax.Schedule:
  """Learning rate at update k (k = 0 is the first update).

  Warm-up multiplies the peak by k / warmup_steps, so the first update uses LR 0 as in the reference.
  WSD decays linearly to exactly 0 at k = total_steps over the last `decay_steps` updates.
  """
  lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
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


def make_optimizer(opt_cfg: Any, total_steps: int, decay_mask: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW with weight decay only where `decay_mask` is True."""
  if opt_cfg.name != "adamw":
    raise ValueError(f"optimizer.name={opt_cfg.name!r}: unknown (known: adamw)")
  lr = schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip and float(opt_cfg.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
  parts.append(optax.adamw(lr, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2), eps=float(opt_cfg.eps),
                           weight_decay=float(opt_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts), lr
