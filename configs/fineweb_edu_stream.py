"""FineWeb-Edu, streamed from parquet (TASKS.md §6): GPT-2 BPE, rows of 1025 tokens, GPT-124M-size trunk.

A quick-start preset (not the paper's 1.3B run): the data are tokenized and packed on the fly, so no
preparation step, but a run resumes only on the same number of processes (docs/data.md). For long or
elastic runs use configs/fineweb_edu_pretok.py.

  nextlat train --config=configs/fineweb_edu_stream.py --workdir=/tmp/fw_stream \
      --config.data.path=/data/fineweb-edu/sample/100BT \
      [--config.data.tokenizer_path=DIR_WITH_encoder.json_vocab.bpe] \
      [--config.data.eval_path=/data/fineweb-edu/heldout.parquet --config.eval_every=500]

get_config("gpt") trains the GPT baseline on the same data.
"""
from nextlat_jax.config import base_config
from nextlat_jax.data.sources import fineweb


def get_config(arg: str | None = None):
  c = base_config()
  c.seed = 0
  c.steps = 20_000
  c.batch_size = 64  # global rows per step: 64 x 1024 = 65,536 tokens (not the paper's 512)
  c.log_every = 20
  c.eval_every = 0  # needs a held-out shard: set data.eval_path, then e.g. eval_every=500
  c.eval_steps = 4
  c.checkpoint.update(every=1000, keep=3)
  c.data = fineweb.default_data_config()  # data.path: the parquet shards (folder, glob or URL)
  c.data.eval_rows = c.batch_size * c.eval_steps
  c.model.update(vocab_size=50304,  # GPT-2's 50,257 padded to a multiple of 128 (TASKS.md §6)
                 d_model=768, n_layer=12, n_head=12, dtype="bfloat16", param_dtype="float32")
  c.dynamics.hidden = 2 * 768
  c.objective.update(name="nextlat", horizon=1, lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=6e-4, schedule="wsd", warmup_steps=500, decay_steps=4000,  # not specified
                     weight_decay=0.1, grad_clip=1.0)
  if arg:
    c.objective.name = arg
  return c
