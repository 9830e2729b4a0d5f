"""Countdown (TASKS.md section 2; paper Table 5, Countdown column).

  get_config("OBJECTIVE,dK,tiny")   every part optional, any order, comma-separated, e.g.
  nextlat train --config=configs/countdown.py:nextlat,d4 --workdir=...

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek.
dK: horizon d = K for NextLat / MTP / JTP; the paper sweeps d1 (default), d4, d8.
tiny: a CPU-sized model on 2,048 training problems (about a minute on a laptop CPU).

Paper settings: 12 layers x 768, 12 heads; 100k steps of 1024 rows; AdamW lr 3e-4 constant, weight
decay 0.1, clip 1; lambda_next_h = 2, lambda_KL = 1; p_psi width 768; 500k training problems, 10k
test problems, 10% of the targets held out; 3 seeds (which ones is not reported). lambda_MTP for
MTP/JTP is not reported (1.0 kept). The first epoch generates the 500k problems on the fly (about
0.5-1 ms each on one core, cached in memory afterwards). Metric: nextlat_jax.eval.metrics.countdown.
"""
from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.tasks.countdown import default_data_config


def parse(arg: str | None) -> tuple[str, int, bool]:
  """"nextlat,d4,tiny" -> ("nextlat", 4, True)."""
  name, m, tiny = parse_preset(arg, "configs/countdown.py", r"d([1-9]\d*)", "a horizon d<K> (e.g. d4)")
  return name, int(m[1]) if m else 1, tiny


def get_config(arg: str | None = None):
  name, horizon, tiny = parse(arg)
  c = base_config()
  c.seed = 0  # 3 seeds in the paper, values not reported
  c.steps = 100_000
  c.batch_size = 1024
  c.log_every = 50
  c.eval_every = 2000  # not specified
  c.eval_steps = 4  # not specified
  c.checkpoint.update(every=5000, keep=2)  # not specified
  c.data = default_data_config()
  c.model.update(d_model=768, n_layer=12, n_head=12)  # vocab 10,008 from the data; H_ff 2048
  c.dynamics.hidden = 768
  c.objective.update(name=name, horizon=horizon, lambda_next_h=2.0, lambda_kl=1.0)
  c.optimizer.update(lr=3e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
  if tiny:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 100, 32, 10, 50, 2
    c.checkpoint.every = 0
    c.data.update(n_train=2048, n_test=128)
    c.model.update(d_model=64, n_layer=2, n_head=2)
    c.dynamics.hidden = 64
    c.optimizer.lr = 1e-3
  return c
