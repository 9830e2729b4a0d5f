"""A ~100M-parameter NextLat model on the quickstart's street-grid data, for CPU benchmarks
(`nextlat bench checkpoint`, remat / MFU measurements). 12 layers x 768 (GPT-2 small shape).

  nextlat bench step --config=configs/bench_100m.py     # GPT and NextLat d=1 under every remat policy
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (the sibling config file)


def get_config(arg: str | None = None):
  c = quickstart.get_config(arg)
  c.model.update(d_model=768, n_layer=12, n_head=12)
  c.dynamics.hidden = 1536
  c.batch_size = 8
  c.data.seq_len = 128
  c.bench = ml_collections.ConfigDict(dict(
      objectives=("nextlat",), horizons=(1,),
      remats=("none", "dots", "dots_no_batch", "full"),  # every variant under each policy
      warmup_steps=1, rounds=5, steps_per_round=1, matmul_repeats=2))
  return c
