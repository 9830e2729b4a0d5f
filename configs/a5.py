"""The A5 word problem (TASKS.md section 4; paper Table 5, A5 column).

  get_config("OBJECTIVE,len36,tiny")   every part optional, any order, comma-separated, e.g.
  nextlat train --config=configs/a5.py:gpt,len36 --workdir=...

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek (the paper runs nextlat and gpt).
lenK: train on words of K tokens (default 12; len36 is the paper's "GPT on 36 tokens" baseline).
tiny: a CPU-sized model on 4,096 words (about a minute on a laptop CPU).

Paper settings: 2 layers x 512, 8 heads, RoPE; 400k steps of 1024 rows; AdamW lr 1e-4 constant,
weight decay 0.01, clip 1; NextLat d = 1, lambda_next_h = 1, lambda_KL = 0, p_psi width 1024; 1M
unique length-12 words (80% train), ~100k length-36 test words. Seeds are not specified.
The rows carry `labels` (running products); the objectives must train on them (see
nextlat_jax.data.tasks.a5). Metric: nextlat_jax.eval.metrics.a5 (transformer and RNN modes).
"""
from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.tasks.a5 import default_data_config


def parse(arg: str | None) -> tuple[str, int, bool]:
  """"gpt,len36,tiny" -> ("gpt", 36, True)."""
  name, m, tiny = parse_preset(arg, "configs/a5.py", r"len([1-9]\d*)", "a training length len<K> (e.g. len36)")
  return name, int(m[1]) if m else 12, tiny


def get_config(arg: str | None = None):
  name, train_len, tiny = parse(arg)
  c = base_config()
  c.seed = 0  # not specified
  c.steps = 400_000
  c.batch_size = 1024
  c.log_every = 100
  c.eval_every = 5000  # not specified
  c.eval_steps = 4  # not specified
  c.checkpoint.update(every=10_000, keep=2)  # not specified
  c.data = default_data_config()
  c.data.update(train_len=train_len, seq_len=train_len)
  c.model.update(d_model=512, n_layer=2, n_head=8)  # vocab 61 from the data; H_ff 1408
  c.dynamics.hidden = 1024
  c.objective.update(name=name, horizon=1, lambda_next_h=1.0, lambda_kl=0.0)
  c.optimizer.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=1.0)
  if tiny:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 100, 32, 10, 50, 2
    c.checkpoint.every = 0
    c.data.update(n_words=4096, n_test=256)
    c.model.update(d_model=64, n_layer=2, n_head=4)
    c.dynamics.hidden = 128
    c.optimizer.lr = 1e-3
  return c
