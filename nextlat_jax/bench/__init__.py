"""Benchmarks: `nextlat bench <name> --flags`. Each prints medians and ratios measured in one run."""
from __future__ import annotations

import importlib

from absl import app

# name -> module with `command(argv)`; argv[0] is the benchmark's name.
BENCHES = {
    "step": "nextlat_jax.bench.step",
    "decode": "nextlat_jax.bench.decode",
    "checkpoint": "nextlat_jax.bench.checkpoint",
    "data": "nextlat_jax.bench.data",
}
SUBCOMMANDS = BENCHES  # the CLI imports `bench <name>`'s module before parsing, so its flags exist


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in BENCHES:
    raise app.UsageError(f"usage: nextlat bench <{'|'.join(BENCHES)}> --flags")
  importlib.import_module(BENCHES[argv[1]]).command(argv[1:])
