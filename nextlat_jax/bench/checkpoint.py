"""`nextlat bench checkpoint --config=...`: the blocking part of an asynchronous Orbax save, against
the train step time of the same config, measured in one process (target: ratio <= 0.05)."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax
import ml_collections
from absl import flags

from nextlat_jax.data import pipeline
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import checkpoint, preflight, sizes
from nextlat_jax.train import step as step_lib

flags.DEFINE_integer("bench_steps", 8, "bench checkpoint: timed train steps.")
flags.DEFINE_integer("bench_saves", 4, "bench checkpoint: timed saves.")
FLAGS = flags.FLAGS


def run(config: ml_collections.ConfigDict, steps: int = 8, saves: int = 4, directory: str | None = None,
        snapshot_on_device: bool = True) -> dict:
  config, info = preflight.resolve(config)
  setup = step_lib.build(config, make_mesh(config.mesh))
  B = int(config.batch_size)
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, info.row_len),
                              setup.abstract_rng()).compile()
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=B, seed=0,
                             process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = pipeline.BatchIterator(ds, 0, {})
  rng = jax.random.PRNGKey(0)
  state = setup.init(rng)
  batch = step_lib.global_batch(next(data_iter), setup.batch_sharding)
  state, m = compiled(state, batch, rng)  # warm-up
  jax.block_until_ready(m)
  step_times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, rng)
    jax.block_until_ready(m)
    step_times.append(time.perf_counter() - t0)

  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    mgr = checkpoint.manager(tmp, ml_collections.ConfigDict(dict(config.checkpoint.to_dict(), keep=2, async_save=True)))
    saver = checkpoint.BackgroundSaver(mgr, snapshot_on_device)
    blocking, total = [], []
    config_dict = json.loads(config.to_json())
    for i in range(saves):
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      saver.save(steps + 2 + i, state, data_iter, config_dict, force=True)
      t1 = time.perf_counter()
      # the train loop continues here; the write finishes in the background
      state, m = compiled(state, batch, rng)
      jax.block_until_ready(m)
      saver.wait()
      blocking.append(t1 - t0)
      total.append(time.perf_counter() - t0)
    saver.close()
  n_params = sizes.param_count(state.params)
  step_s = statistics.median(step_times)
  block_s = statistics.median(blocking)
  return {"params": n_params, "state_mib": round(3 * 4 * n_params / 2**20, 1), "step_s": step_s,
          "save_blocking_s": block_s, "save_total_s": statistics.median(total),
          "blocking_over_step": block_s / step_s, "target": 0.05, "pass": block_s / step_s <= 0.05,
          "snapshot_on_device": snapshot_on_device, "devices": jax.device_count(),
          "platform": jax.devices()[0].platform}


def command(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None:
    raise ValueError("bench checkpoint needs --config")
  res = [run(FLAGS.config, FLAGS.bench_steps, FLAGS.bench_saves, snapshot_on_device=s) for s in (True, False)]
  print(json.dumps(res, indent=2))
  if FLAGS.workdir:
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "bench_checkpoint.json"), "w") as f:
      json.dump(res, f, indent=2)
