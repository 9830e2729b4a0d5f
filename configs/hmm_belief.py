"""Belief-state task: sequences of a random hidden Markov model (nextlat_jax.data.tasks.hmm; a project
task, not in the paper), CPU-sized.

  get_config("OBJECTIVE,muon")   every part optional, any order, comma-separated, e.g.
  nextlat train --config=configs/hmm_belief.py:nextlat --workdir=/tmp/hmm_nextlat
  nextlat eval --workdir=/tmp/hmm_nextlat        # -> /tmp/hmm_nextlat/eval/hmm.json (belief metrics)

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek.
muon: optimizer.name = "muon" (Muon on the hidden matrices, AdamW on the rest; docs/research.md).

The HMM: 12 hidden states, 3 symbols, Dirichlet(0.1) transition and emission rows, 64 symbols per row. Metric (nextlat_jax.eval.metrics.belief): held-out R^2 of a linear probe from h_t to the exact
belief P(z_t | x_1..x_t), KL(true next-symbol law || model's), effective rank. Every value below is a
project choice (the paper has no such task): a 2 x 64 model trains in about a minute on a laptop CPU.
"""
from nextlat_jax.config import base_config
from nextlat_jax.data.tasks.hmm import default_data_config

OBJECTIVES = ("nextlat", "gpt", "mtp", "jtp", "bst", "mtp_deepseek")


def parse(arg: str | None) -> tuple[str, bool]:
  """"gpt,muon" -> ("gpt", True)."""
  name, muon = "nextlat", False
  for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    if part in OBJECTIVES:
      name = part
    elif part == "muon":
      muon = True
    else:
      raise ValueError(f"configs/hmm_belief.py argument part {part!r}: expected an objective {OBJECTIVES} "
                       "or 'muon'")
  return name, muon


def get_config(arg: str | None = None):
  name, muon = parse(arg)
  c = base_config()
  c.seed = 0
  c.steps = 600
  c.batch_size = 32
  c.log_every = 50
  c.eval_every = 300
  c.eval_steps = 2
  c.checkpoint.update(every=300, keep=1)
  c.data = default_data_config()
  c.model.update(d_model=64, n_layer=2, n_head=4)  # vocab 4 from the data
  c.dynamics.hidden = 128
  c.objective.update(name=name, horizon=1, lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=1e-3, schedule="constant", warmup_steps=20, weight_decay=0.01, grad_clip=1.0)
  if muon:
    c.optimizer.update(name="muon", muon_lr=0.02)
  return c
