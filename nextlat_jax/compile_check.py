"""`nextlat compile-check --config=... --mesh=D,F,T`: lower and compile the full-size train step with
abstract inputs (nothing is allocated) on a simulated mesh of CPU devices, and print per-device
memory, so a layout can be checked before renting hardware."""
from __future__ import annotations

import json
import math
import os

from absl import flags

flags.DEFINE_string("mesh", None, "Mesh sizes data,fsdp,tensor (e.g. 1,8,1); the command "
                    "simulates that many CPU devices.")
FLAGS = flags.FLAGS


def simulate_devices(argv: list[str]) -> None:
  """Sets the fake CPU device count from --mesh before JAX starts (called by the CLI)."""
  for a in argv:
    if a.startswith("--mesh="):
      n = math.prod(int(x) for x in a.split("=", 1)[1].split(","))
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={n}").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


def check(config, mesh_sizes: tuple[int, int, int] | None = None) -> dict:
  import jax

  from nextlat_jax import config as config_lib
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import step as step_lib
  from nextlat_jax.train.sizes import GIB, param_count, step_memory

  import ml_collections
  config = ml_collections.ConfigDict(config.to_dict())
  if mesh_sizes:
    config.mesh.update(data=mesh_sizes[0], fsdp=mesh_sizes[1], tensor=mesh_sizes[2])
  if not config.model.vocab_size:
    raise config_lib.ConfigError("model.vocab_size", 0, "compile-check needs an explicit vocabulary size")
  config_lib.validate(config, jax.device_count())
  setup = step_lib.build(config, make_mesh(config.mesh))
  row_len = int(config.data.seq_len) + 1
  lowered = setup.step.lower(setup.abstract_state, setup.abstract_batch(int(config.batch_size), row_len),
                             setup.abstract_rng())
  compiled = lowered.compile()
  return {"mesh": dict(setup.mesh.shape), "devices": jax.device_count(),
          "params": {k: param_count(v) for k, v in setup.abstract_state.params.items()},
          "per_device_memory_gib": step_memory(compiled, GIB, 3)}


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.config is None:
    raise ValueError("compile-check needs --config")
  sizes = tuple(int(x) for x in FLAGS.mesh.split(",")) if FLAGS.mesh else None
  if sizes is not None and len(sizes) != 3:
    raise ValueError(f"--mesh={FLAGS.mesh!r}: expected three sizes data,fsdp,tensor")
  print(json.dumps(check(FLAGS.config, sizes), indent=2))
