"""Manhattan taxi world model (TASKS.md section 1; paper Table 5, Manhattan column; Table 1 metrics) on
the real street graph, `../shared/data/manhattan/edges.tsv` (4,579 intersections, V = 4,589).

  get_config("OBJECTIVE,dK,tiny")   every part optional, any order, comma-separated, e.g.
  nextlat train --config=configs/manhattan.py:gpt --workdir=runs/manhattan_gpt
  nextlat eval --workdir=runs/manhattan_gpt --metrics=all    # Table 1's five metrics + effective rank

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek. dK: horizon (the paper: 8).
tiny: a CPU-sized model (2 x 64, rows of 65 tokens, d = 2 unless dK is given) that trains in about a
minute on a laptop CPU.

Paper settings: 48 layers x 384, 8 heads (88M parameters with V = 4,589); 400k steps of 256 rows;
AdamW lr 1e-4 constant, weight decay 0.01, no gradient clipping; lambda_next_h = 1, lambda_KL = 0.1;
p_psi width 1536; horizon d = 8. Block 256 is derived (400k x 256 x 256 tokens is the paper's "6
epochs" of Vafa et al.'s 4.7B tokens). Not specified (our choice): the seed, the eval cadence and the
checkpoint cadence; walks of 3..97 moves so that a document has at most 100 tokens (TASKS.md 1.3).
"""
import os

from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.pipeline import default_data_config

GRAPH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                     "manhattan", "edges.tsv")


def parse(arg: str | None) -> tuple[str, int, bool]:
  """"gpt,d8,tiny" -> ("gpt", 8, True)."""
  name, m, tiny = parse_preset(arg, "configs/manhattan.py", r"d([1-9]\d*)", "a horizon d<K> (e.g. d8)")
  return name, int(m[1]) if m else (2 if tiny else 8), tiny


def get_config(arg: str | None = None):
  name, horizon, tiny = parse(arg)
  c = base_config()
  c.seed = 0  # not specified
  c.steps = 400_000
  c.batch_size = 256
  c.log_every = 100
  c.eval_every = 5000  # not specified
  c.eval_steps = 4  # not specified
  c.checkpoint.update(every=5000, keep=2)  # not specified
  c.data = default_data_config()
  c.data.update(name="manhattan", graph_path=os.path.normpath(GRAPH), seq_len=256, min_moves=3, max_moves=97)
  c.model.update(d_model=384, n_layer=48, n_head=8)  # vocab 4,589 from the graph; H_ff 1024
  c.dynamics.hidden = 1536
  c.objective.update(name=name, horizon=horizon, lambda_next_h=1.0, lambda_kl=0.1)
  c.optimizer.update(lr=1e-4, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=0.0)
  if tiny:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 30, 8, 10, 15, 1
    c.checkpoint.update(every=15)
    c.data.update(seq_len=64, eval_rows=64)
    c.model.update(d_model=64, n_layer=2, n_head=2)
    c.dynamics.hidden = 128
    c.optimizer.lr = 1e-3
  return c
