"""One-GPU device check (issue 8): GPT vs NextLat d=1 train steps of the 1.3B FineWeb-Edu model at the
largest batch that fits, with MFU, tokens/s and the step-time ratio.

  bash launch/device_check.sh                                      # what to run on a lent GPU
  nextlat bench step --config=configs/device_check.py:smoke        # the same path, tiny, on CPU

The 1.3B model of configs/fineweb_edu_1p3b.py (22 x 2048, 16 heads, vocabulary 50,304, bf16 compute,
fp32 params, AdamW) on random packed 1024-token rows; one device, no gradient accumulation. The batch
starts at bench_rows and is halved until the NextLat step compiles within 95% of the device memory.
Remat: "dots_no_batch" keeps matmul outputs and recomputes the rest (MFU counts model FLOPs only, so
recompute lowers it; "none" is faster where it fits: --config.model.remat=none).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402  (sibling config: the bench block)
import fineweb_edu_1p3b  # noqa: E402


def get_config(arg: str | None = None):
  c = fineweb_edu_1p3b.get_config("nextlat_d1")
  c.batch_size = 32  # the first batch tried; halved until it fits
  c.microbatches = 1
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.objective.remat_rollout = False
  c.model.attention_impl = "auto"  # the Pallas flash kernel on GPU / TPU (xla on CPU); fused losses by default
  c.data = ml_collections.ConfigDict(dict(name="random", seq_len=1024, eos_id=50256, mean_doc_len=512,
                                          context_length=-1))
  c.bench = bench_step.get_config().bench
  c.bench.update(objectives=("nextlat",), horizons=(1,), fit_batch=True, memory_fraction=0.95,
                 warmup_steps=2, rounds=6, steps_per_round=2, matmul_repeats=2)
  if arg == "smoke":  # CPU: a tiny model and a pretend 8 MiB device, to exercise the fitting
    c.batch_size = 8
    c.model.update(vocab_size=512, d_model=64, n_layer=2, n_head=2, dtype="float32")
    c.dynamics.hidden = 128
    c.data.update(seq_len=64, eos_id=0, mean_doc_len=16)
    c.bench.update(memory_limit_gib=0.008, warmup_steps=1, rounds=2, steps_per_round=1, matmul_repeats=1)
  elif arg:
    raise ValueError(f"configs/device_check.py: unknown preset {arg!r} (known: smoke)")
  return c
