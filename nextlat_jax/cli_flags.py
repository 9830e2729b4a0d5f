"""The flags several `nextlat` commands share: --config, --workdir, --step, --out and the multi-process
start-up.

They are defined here once, at import: nextlat_jax.cli imports this module (and tests that call a command
function in-process import nextlat_jax.cli for them). `nextlat <command>` then keeps only the shared flags
its command reads (`keep_only`, with nextlat_jax.cli.TAKES) before parsing, so the command's --help lists
those and its own flags, and a shared flag it does not read is an unknown flag there.
"""
from __future__ import annotations

from typing import Iterable

from absl import flags
from ml_collections import config_flags

DISTRIBUTED = ("distributed", "coordinator_address", "num_processes", "process_id")
SHARED = ("config", "workdir", "step", "out", *DISTRIBUTED)

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py, `get_config(arg)`); append ':arg' for a "
    "preset. Override any value with --config.<key>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl, tensorboard/, config.json, checkpoints/.")
flags.DEFINE_integer("step", None, "The checkpoint step to read (default: the newest).")
flags.DEFINE_string("out", None, "The folder to write (export-hf: a Hugging Face folder; import-hf: a run folder, "
                    "OUT/checkpoints/0).")
flags.DEFINE_bool("distributed", False, "Join a multi-process job (jax.distributed): cluster auto-detection "
                  "(TPU pod, SLURM) unless --coordinator_address is given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")


def keep_only(names: Iterable[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Removes the shared flags that are not in `names` from `flag_values` (before parsing)."""
  names = set(names)
  unknown = names - set(SHARED)
  if unknown:
    raise ValueError(f"not shared flags: {sorted(unknown)} (shared: {', '.join(SHARED)})")
  for name in SHARED:
    if name not in names and name in flag_values:
      delattr(flag_values, name)


def flag_value(args: list[str], name: str) -> str | None:
  """The value of `--NAME=VALUE` / `--NAME VALUE` in raw args, before absl parses them; the last one, as
  absl keeps the last of a repeated flag."""
  value = None
  for i, a in enumerate(args):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(args):
      value = args[i + 1]
  return value

