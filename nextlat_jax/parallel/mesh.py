"""The (data, fsdp, tensor) device mesh."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


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
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):  # topologies mesh_utils does not know
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)
