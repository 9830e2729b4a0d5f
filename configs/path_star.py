"""Path-Star graphs G_{d,l} (TASKS.md section 3; paper Table 5, Path-Star column).

  get_config("OBJECTIVE,GRAPH,tiny")   every part optional, any order, comma-separated, e.g.
  nextlat train --config=configs/path_star.py:gpt,g2_10 --workdir=...

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek.
GRAPH: g{d}_{l}; the paper's three are g2_10, g5_5 (default) and g7_7.
tiny: a CPU-sized model on G_{2,5} with 2,000 training graphs (about a minute on a laptop CPU).

Paper settings: 12 layers x 384, 6 heads; 20k steps of 512 rows; AdamW lr 5e-4 constant (no warm-up,
as the reference), weight decay 0.1, clip 100; lambda_next_h = lambda_KL = 1; p_psi width 384;
horizon d = l - 2 for NextLat, MTP and JTP; 200k fixed training graphs, 20k test graphs, N = 100;
seeds 1234..1238 (--config.seed). lambda_MTP for MTP/JTP is not reported (1.0 kept).
Exact-path accuracy: nextlat_jax.eval.metrics.path_star.
"""
from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.tasks.path_star import default_data_config


def parse(arg: str | None) -> tuple[str, tuple[int, int], bool]:
  """"nextlat,g2_10,tiny" -> ("nextlat", (2, 10), True)."""
  name, m, tiny = parse_preset(arg, "configs/path_star.py", r"[gG](\d+)_(\d+)", "a graph g<d>_<l> (e.g. g5_5)")
  return name, (int(m[1]), int(m[2])) if m else ((2, 5) if tiny else (5, 5)), tiny


def get_config(arg: str | None = None):
  name, (degree, path_len), tiny = parse(arg)
  c = base_config()
  c.seed = 1234  # the reference sweep uses 1234..1238
  c.steps = 20_000
  c.batch_size = 512
  c.log_every = 50
  c.eval_every = 1000  # not specified
  c.eval_steps = 4  # not specified
  c.checkpoint.update(every=5000, keep=2)  # not specified
  c.data = default_data_config(degree, path_len)
  c.model.update(d_model=384, n_layer=12, n_head=6)  # vocab 106 from the data; H_ff 1024
  c.dynamics.hidden = 384
  c.objective.update(name=name, horizon=max(path_len - 2, 1), lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=5e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip=100.0)
  if tiny:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 150, 32, 10, 50, 2
    c.checkpoint.every = 0
    c.data.update(n_train=2000, n_test=256)
    c.model.update(d_model=64, n_layer=2, n_head=2)
    c.dynamics.hidden = 64
    c.optimizer.lr = 1e-3
  return c
