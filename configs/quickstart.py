"""Embedded default: NextLat (d=2) on random walks over a generated 8x8 one-way street grid, on CPU.

The world-model setting of the paper (Manhattan taxi rides, TASKS.md section 1) at toy scale: the data
is generated on the fly, so it runs anywhere in a few minutes and the loss visibly falls.

  nextlat train --config=configs/quickstart.py --workdir=/tmp/nextlat_quickstart
"""
from nextlat_jax.config import base_config
from nextlat_jax.data.pipeline import default_data_config


def get_config(arg: str | None = None):
  c = base_config()
  c.seed = 0
  c.steps = 600
  c.batch_size = 16
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 4
  c.checkpoint.update(every=100, keep=3)
  c.data = default_data_config()  # 8x8 grid, rows of 129 tokens, context_length 1
  c.model.update(d_model=128, n_layer=4, n_head=4)  # vocab_size 0: from the data (1 + 9 + 64 = 74)
  c.dynamics.hidden = 256
  c.objective.update(name="nextlat", horizon=2, lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=50, weight_decay=0.01, grad_clip=1.0)
  if arg:  # e.g. get_config("gpt") for the baseline on the same data
    c.objective.name = arg
  return c
