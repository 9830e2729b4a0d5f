"""`nextlat compile-check --config=... --mesh=D,F,T`: lower and compile the full-size train step with
abstract inputs (nothing is allocated) on a simulated mesh of CPU devices, and print per-device
memory, so a layout can be checked before renting hardware."""
from __future__ import annotations

import json
import math
import os

from absl import flags

from nextlat_jax import cli_flags
from nextlat_jax.errors import ConfigError, fail

flags.DEFINE_string("mesh", None, "Mesh sizes data,fsdp,tensor (e.g. 1,8,1); the command "
                    "simulates that many CPU devices.")
FLAGS = flags.FLAGS


def parse_mesh(value: str) -> tuple[int, int, int]:
  """--mesh=D,F,T as three sizes; ConfigError naming --mesh unless they are three integers >= 1 (the
  command simulates their product in devices, so no axis can be -1, "the remaining devices")."""
  parts = [p.strip() for p in value.split(",")]
  if len(parts) != 3:
    raise ConfigError("--mesh", value, f"expected three sizes data,fsdp,tensor (e.g. 1,8,1), got {len(parts)}")
  bad = next((p for p in parts if not (p.isdigit() and int(p) >= 1)), None)
  if bad is not None:
    raise ConfigError("--mesh", value, f"size {bad!r}: each size must be an integer >= 1 (compile-check "
                      "simulates data*fsdp*tensor CPU devices, so no axis can be -1)")
  return tuple(int(p) for p in parts)  # type: ignore[return-value]


def simulate_devices(argv: list[str]) -> None:
  """Sets the fake CPU device count from --mesh before JAX starts (called by the CLI); a bad --mesh is
  one line and exit status 2, before anything starts."""
  value = cli_flags.flag_value(argv, "mesh")
  if value is None:
    return
  try:
    n = math.prod(parse_mesh(value))
  except ConfigError as e:
    fail(str(e))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _fill_from_data(config) -> int | None:
  """Fills what training takes from the dataset (model.vocab_size 0, data.eos_id unset) as
  preflight.resolve does; returns the data's vocabulary size when it was read, else None (both given:
  the data need not exist here). A dataset that cannot be read is a one-line ConfigError."""
  from nextlat_jax.data import pipeline
  from nextlat_jax.train import preflight
  missing = [k for k, is_open in (("model.vocab_size", not config.model.vocab_size),
                                  ("data.eos_id", config.data.get("eos_id") is None)) if is_open]
  if not missing:
    return None
  try:
    info = pipeline.dataset_info(config.data)
  except ConfigError:
    raise
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError("data", config.data.get("name"), f"{e} (compile-check reads {' and '.join(missing)} "
                      "from the data; a config that sets both needs no data)") from None
  preflight.fill_from_data(config, info)
  return info.vocab_size


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
  data_vocab = _fill_from_data(config)
  config_lib.validate(config, jax.device_count(), data_vocab=data_vocab)
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
  sizes = parse_mesh(FLAGS.mesh) if FLAGS.mesh is not None else None
  print(json.dumps(check(FLAGS.config, sizes), indent=2))
