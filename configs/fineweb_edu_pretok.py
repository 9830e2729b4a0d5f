"""FineWeb-Edu from pre-tokenized ArrayRecord shards (TASKS.md §6): the path for long runs.

Prepare once (parallel, resumable), then train; batches are a pure function of (seed, step, process,
process count), so a run resumes from the step alone, also on a different number of hosts:

  nextlat prepare --input=/data/fineweb-edu/sample/100BT --output=/data/fwedu_gpt2_1024 --seq_len=1024
  nextlat train --config=configs/fineweb_edu_pretok.py --workdir=/tmp/fw_pretok \
      --config.data.path=/data/fwedu_gpt2_1024 [--config.data.eval_path=/data/fwedu_heldout_gpt2_1024]

A GPT-124M-size preset (the 1.3B preset is separate), the model and training of
configs/fineweb_edu_stream.py. Without data.eval_path the last
data.eval_rows rows of data.path are held out for the eval split. get_config("gpt"): the baseline.
"""
import os
import sys

from nextlat_jax.data.sources import pretokenized

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fineweb_edu_stream  # noqa: E402  (the sibling config: the same model, objective and optimizer)


def get_config(arg: str | None = None):
  c = fineweb_edu_stream.get_config(arg)
  c.eval_every = 500
  c.data = pretokenized.default_data_config()  # data.path: a `nextlat prepare` output directory
  c.data.eval_rows = c.batch_size * c.eval_steps  # held out from data.path unless eval_path is set
  return c
