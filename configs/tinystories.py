"""TinyStories (TASKS.md section 5; paper Table 5, TinyStories column): long-horizon predictivity,
measured by 20 linear probes of h_t for the tokens 1..20 ahead (`nextlat eval` runs them).

  get_config("OBJECTIVE,dK,tiny")   every part optional, any order, comma-separated, e.g.
  nextlat prepare --input=/data/TinyStories2-ascii/train --output=/data/ts_train --seq_len=256 \
      --tokenizer=bpe --train_bpe=1000
  nextlat prepare --input=/data/TinyStories2-ascii/validation --output=/data/ts_val --seq_len=256 \
      --tokenizer=bpe --tokenizer_path=/data/ts_train/tokenizer.json
  nextlat train --config=configs/tinystories.py:nextlat,d8 --workdir=runs/ts_nextlat_d8 \
      --config.data.path=/data/ts_train --config.data.eval_path=/data/ts_val
  nextlat eval --workdir=runs/ts_nextlat_d8 --probe_reference=runs/ts_gpt

OBJECTIVE: nextlat (default) | gpt | mtp | jtp | bst | mtp_deepseek. dK: horizon (the paper: 1 and 8).
tiny: a CPU-sized model (2 x 64) for a quick check on any prepared corpus.

Paper settings: 8 layers x 768, 8 heads; 100k steps of 256 rows x 256 tokens; AdamW lr 3e-4, weight
decay 0.1, clip 1; lambda_next_h = lambda_KL = 1; p_psi width 2048. Not specified (our choice): the
schedule (constant, as the other small tasks), seed 0, eval cadence, and the tokenizer: the BST 1k BPE
is not public here, so `prepare --train_bpe=1000` trains one on the train split (TASKS.md allows it).
Rows are packed across stories at a fixed stride (stories span rows), as in the reference.
"""
from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.sources import pretokenized


def parse(arg: str | None) -> tuple[str, int, bool]:
  """"gpt,d8,tiny" -> ("gpt", 8, True)."""
  name, m, tiny = parse_preset(arg, "configs/tinystories.py", r"d([1-9]\d*)", "a horizon d<K> (e.g. d8)")
  return name, int(m[1]) if m else 1, tiny


def get_config(arg: str | None = None):
  name, horizon, tiny = parse(arg)
  c = base_config()
  c.seed = 0  # not specified
  c.steps = 100_000
  c.batch_size = 256
  c.log_every = 50
  c.eval_every = 2000  # not specified
  c.eval_steps = 8  # not specified
  c.checkpoint.update(every=5000, keep=2)  # not specified
  c.eval_task = "probes"  # what `nextlat eval` runs for this config (the data source is generic)
  c.data = pretokenized.default_data_config()  # data.path: a `nextlat prepare --seq_len=256` output
  c.data.seq_len = 256
  c.data.eval_rows = c.batch_size * c.eval_steps  # held out from data.path unless data.eval_path is set
  c.model.update(d_model=768, n_layer=8, n_head=8)  # vocabulary (1,000) from the prepared data
  c.dynamics.hidden = 2048
  c.objective.update(name=name, horizon=horizon, lambda_next_h=1.0, lambda_kl=1.0, lambda_mtp=1.0)
  c.optimizer.update(lr=3e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
  if tiny:
    c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_steps = 60, 8, 10, 30, 2
    c.checkpoint.every = 30
    c.data.seq_len = 64
    c.data.eval_rows = 16
    c.model.update(d_model=64, n_layer=2, n_head=2)
    c.dynamics.hidden = 128
  return c
