"""A small text model on a local corpus prepared by `nextlat prepare` (docs/text.md): the real-text flow
on a laptop or a 2-core CPU, offline. NextLat d=1 with the paper's FineWeb-Edu lambdas (all 1.0).

  nextlat prepare --input=books.parquet --output=data/books --seq_len=128 --tokenizer=bpe --train_bpe=2000
  nextlat train --config=configs/text_small.py --workdir=runs/text_small --config.data.path=data/books

get_config("gpt") is the GPT baseline on the same rows; get_config("tiny") (or "gpt,tiny") a 2 x 64 model
for tests and smoke runs. The vocabulary and EOS come from the prepared folder's manifest.
"""
from nextlat_jax.config import base_config, parse_preset
from nextlat_jax.data.sources import pretokenized


def get_config(arg: str | None = None):
  name, _, tiny = parse_preset(arg, "configs/text_small.py", r"(?!)", "no other option")
  c = base_config()
  c.seed = 0
  c.steps = 2000  # not specified: ~1M tokens of 64 x 128-token rows per 125 steps
  c.batch_size = 64
  c.log_every = 10
  c.eval_every = 200
  c.eval_steps = 2
  c.checkpoint.update(every=200, keep=3)
  c.data = pretokenized.default_data_config()  # data.path: a `nextlat prepare` output folder
  c.data.eval_rows = c.batch_size * c.eval_steps  # the last rows of data.path are held out
  c.model.update(d_model=256, n_layer=4, n_head=4)  # vocab_size 0: the manifest's
  c.dynamics.hidden = 512
  c.objective.update(name=name, horizon=1, lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.1, grad_clip=1.0)  # not specified
  if tiny:
    c.steps, c.batch_size, c.eval_every, c.eval_steps = 20, 8, 10, 1
    c.data.eval_rows = 8
    c.checkpoint.update(every=10)
    c.model.update(d_model=64, n_layer=2, n_head=2)
    c.dynamics.hidden = 128
  return c
