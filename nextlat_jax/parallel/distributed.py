"""Multi-controller start-up: one process per host, joined by JAX's distributed runtime."""
from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 900) -> None:
  """Joins the job's processes. With no arguments JAX detects the cluster (TPU pod, SLURM, ...);
  with a coordinator address the three values are explicit (e.g. local multi-process runs).

  On CPU the cross-process collectives go through gloo.
  """
  if jax.config.jax_platforms in ("cpu",) or (coordinator_address and "cpu" in (jax.config.jax_platforms or "")):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {"initialization_timeout": timeout_s}
  if coordinator_address:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
