"""FineWeb-Edu from pre-tokenized ArrayRecord shards (TASKS.md §6): the path for long runs.

Prepare once (parallel, resumable), then train; batches are a pure function of (seed, step, process,
process count), so a run resumes from the step alone, also on a different number of hosts:

  nextlat prepare --input=/data/fineweb-edu/sample/100BT --output=/data/fwedu_gpt2_1024 --seq_len=1024
  nextlat train --config=configs/fineweb_edu_pretok.py --workdir=/tmp/fw_pretok \
      --config.data.path=/data/fwedu_gpt2_1024 [--config.data.eval_path=/data/fwedu_heldout_gpt2_1024]

A GPT-124M-size preset (the 1.3B preset is separate). Without data.eval_path the last
data.eval_rows rows of data.path are held out for the eval split. get_config("gpt"): the baseline.
"""
from nextlat_jax.config import base_config
from nextlat_jax.data.sources import pretokenized


def get_config(arg: str | None = None):
  c = base_config()
  c.seed = 0
  c.steps = 20_000
  c.batch_size = 64  # global rows per step: 64 x 1024 = 65,536 tokens (not the paper's 512)
  c.log_every = 20
  c.eval_every = 500
  c.eval_steps = 4
  c.checkpoint.update(every=1000, keep=3)
  c.data = pretokenized.default_data_config()  # data.path: a `nextlat prepare` output directory
  c.data.eval_rows = c.batch_size * c.eval_steps  # held out from data.path unless eval_path is set
  c.model.update(vocab_size=50304,  # GPT-2's 50,257 padded to a multiple of 128 (TASKS.md §6)
                 d_model=768, n_layer=12, n_head=12, dtype="bfloat16", param_dtype="float32")
  c.dynamics.hidden = 2 * 768
  c.objective.update(name="nextlat", horizon=1, lambda_next_h=1.0, lambda_kl=1.0)
  c.optimizer.update(lr=6e-4, schedule="wsd", warmup_steps=500, decay_steps=4000,  # not specified
                     weight_decay=0.1, grad_clip=1.0)
  if arg:
    c.objective.name = arg
  return c
