"""parallel/mesh.py: axis sizes from the config, and the logged fallback to device order."""
import logging

import jax
import ml_collections
import numpy as np
import pytest

from nextlat_jax.parallel import mesh as mesh_lib


def test_mesh_shape_fills_one_axis():
  cfg = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 2})
  assert mesh_lib.mesh_shape(cfg, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="cannot fill -1"):
    mesh_lib.mesh_shape(cfg, 6)


def test_unknown_topology_falls_back_to_device_order_with_a_warning(monkeypatch, caplog):
  cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
  quiet = mesh_lib.make_mesh(cfg)
  assert quiet.devices.shape == (2, 2, 2)

  def unknown(shape, devices):
    raise NotImplementedError("no topology for this device kind")

  monkeypatch.setattr(mesh_lib.mesh_utils, "create_device_mesh", unknown)
  mesh_lib.log.addHandler(caplog.handler)  # the CLI may have stopped nextlat_jax's propagation
  try:
    with caplog.at_level(logging.WARNING, logger=mesh_lib.log.name):
      mesh = mesh_lib.make_mesh(cfg)
  finally:
    mesh_lib.log.removeHandler(caplog.handler)
  np.testing.assert_array_equal(mesh.devices, np.asarray(jax.devices()).reshape(2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  # one record (seen once more through the root logger's handler when nextlat_jax propagates)
  warnings = list({id(r): r for r in caplog.records if r.levelno == logging.WARNING}.values())
  assert len(warnings) == 1, caplog.records
  text = warnings[0].getMessage()
  assert "device order" in text and "NotImplementedError: no topology for this device kind" in text, text
  assert "{'data': 2, 'fsdp': 2, 'tensor': 2}" in text, text
