"""The (data, fsdp, tensor) device mesh."""
from __future__ import annotations

import logging
import math
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Axis sizes from config.mesh; one axis may be -1 to take the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
      raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes))}: cannot fill -1 with {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), laid out by the physical topology
  (mesh_utils); a topology mesh_utils does not know falls back to device order, with a warning."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError) as e:  # topologies mesh_utils does not know
    log.warning("mesh %s over %d %s devices: no topology-aware layout (%s: %s); using device order, so "
                "collectives may cross slower links than needed", dict(zip(MESH_AXES, shape)), len(devices),
                devices[0].device_kind if devices else "?", type(e).__name__, (str(e).splitlines() or [""])[0][:200])
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)
