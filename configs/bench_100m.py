"""A ~100M-parameter NextLat model on the quickstart's street-grid data, for CPU benchmarks
(`nextlat bench checkpoint`, remat / MFU measurements). 12 layers x 768 (GPT-2 small shape)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402  (the sibling config file)


def get_config(arg: str | None = None):
  c = quickstart.get_config(arg)
  c.model.update(d_model=768, n_layer=12, n_head=12)
  c.dynamics.hidden = 1536
  c.batch_size = 8
  c.data.seq_len = 128
  return c
