"""The trainer's performance options (train/profiling.py): a profiler trace of exactly the chosen steps, and
the persistent compilation cache. Their config checks are in tests/test_config.py, the step's donation in
tests/test_sharding.py."""
import collections
import glob
import gzip
import json
import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from nextlat_jax.train import trainer
from tests.test_resume import _inproc_config


def _train_step_executions(trace_json_gz) -> int:
  """How many times the trace saw the train step's executable launched (once per step; the per-device
  launches are named "[i] CommonPjRtLoadedExecutable::Execute (...)")."""
  events = json.load(gzip.open(trace_json_gz))["traceEvents"]
  names = collections.Counter(e.get("name", "") for e in events)
  return sum(n for name, n in names.items() if name.endswith("Execute (jit_train_step)") and not name.startswith("["))


def test_profile_traces_exactly_the_chosen_steps(tmp_path, caplog):
  c = _inproc_config(4)
  c.objective.name = "gpt"
  c.checkpoint.every = 0
  c.train.profile.update(start_step=1, steps=2)
  with caplog.at_level(logging.INFO, logger="nextlat_jax"):
    trainer.train(c, str(tmp_path))
  xplanes = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(xplanes) == 1, os.listdir(tmp_path)
  session = os.path.dirname(xplanes[0])
  traces = glob.glob(os.path.join(session, "*.trace.json.gz"))
  assert len(traces) == 1 and _train_step_executions(traces[0]) == 2  # steps 1 and 2, not 0 or 3
  assert f"profile of steps 1..2 written to {session}" in caplog.text


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


def test_compilation_cache_dir_writes_the_cache(tmp_path, caplog):
  """A run with train.compilation_cache_dir writes its step there. In this process JAX has compiled before,
  so the cache is reset first as in a fresh process, and afterwards turned off again for the other tests
  (a sharded Muon step loaded from the cache aborts XLA:CPU; docs/design.md). GPT, AdamW: nothing here
  loads from the fresh folder."""
  cache = tmp_path / "xla_cache"
  c = _inproc_config(2)
  c.objective.name = "gpt"
  c.checkpoint.every = 0
  c.train.compilation_cache_dir = str(cache)
  before = {k: getattr(jax.config, k) for k in CACHE_OPTIONS}
  compilation_cache.reset_cache()
  try:
    with caplog.at_level(logging.INFO, logger="nextlat_jax"):
      trainer.train(c, str(tmp_path / "run"))
  finally:
    for k, v in before.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
  assert f"persistent compilation cache: {cache}" in caplog.text
  entries = os.listdir(cache)
  assert any(e.startswith("jit_train_step") for e in entries), entries
