"""`nextlat sweep --config=configs/x.py --sweep=configs/sweeps/y.py --workdir=BASE`: expand a sweep
into named runs and print (--dry_run) or launch their `nextlat train` commands.

A sweep file defines `get_sweep()` returning a list of override dicts, usually built with `product`
and `zip_` below, e.g. `product(zip_({"objective.name": ["gpt", "nextlat"]}), {"seed": [0, 1]})`.
"""
from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from typing import Any, Iterable

from absl import flags

from nextlat_jax.config import call_user_file
from nextlat_jax.errors import ConfigError

flags.DEFINE_string("sweep", None, "A Python file with get_sweep() -> list of override dicts.")
flags.DEFINE_enum("launcher", "local", ["local", "slurm"], "Run each command here, one after "
                  "the other (local), or submit each with `sbatch launch/slurm.sbatch` (slurm).")
flags.DEFINE_bool("dry_run", False, "Print the commands, launch nothing.")
FLAGS = flags.FLAGS


def zip_(axes: dict[str, list]) -> list[dict]:
  """{"a": [1, 2], "b": [3, 4]} -> [{"a": 1, "b": 3}, {"a": 2, "b": 4}] (equal lengths)."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zip_: axes of different lengths {lengths}")
  return [dict(zip(axes, values)) for values in zip(*axes.values())]


def product(*parts: list[dict] | dict[str, list]) -> list[dict]:
  """Cartesian product of lists of override dicts (a dict of lists is one axis per key)."""
  lists = []
  for part in parts:
    if isinstance(part, dict):
      lists += [[{k: v} for v in values] for k, values in part.items()]
    else:
      lists.append(list(part))
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*lists)]


def run_name(overrides: dict[str, Any]) -> str:
  """A readable, filesystem-safe name: key tails and values, e.g. `name=nextlat,horizon=2`."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  return ",".join(parts).replace("/", "_").replace(" ", "") or "base"


def load_sweep(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise ConfigError("--sweep", path, "file not found")
  try:
    runs = call_user_file(path, "nextlat_sweep", "get_sweep")
  except ConfigError as e:
    raise ConfigError("--sweep", path, e.why) from None
  if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, dict) for r in runs):
    raise ConfigError("--sweep", path, "get_sweep() must return a non-empty list of dicts")
  return runs


def commands(config_path: str, sweep_path: str, base_workdir: str, extra: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
  """(run name, argv) for every run of the sweep."""
  out, seen = [], set()
  for overrides in load_sweep(sweep_path):
    name = run_name(overrides)
    if name in seen:
      raise ConfigError("--sweep", sweep_path, f"two runs are both named {name!r}")
    seen.add(name)
    argv = ["nextlat", "train", f"--config={config_path}", f"--workdir={os.path.join(base_workdir, name)}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)
    out.append((name, argv))
  return out


def check_runs(config: Any, runs: list[tuple[str, dict]], num_devices: int) -> None:
  """ConfigError naming the run and the key unless every run's config (`config` + its overrides)
  resolves and validates for `num_devices`: a bad run stops the sweep before any run starts."""
  from nextlat_jax.train import preflight
  for name, overrides in runs:
    c = config.copy_and_resolve_references()
    try:
      c.update_from_flattened_dict(overrides)
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"sweep run {name}", overrides, f"does not fit the config: {e}") from None
    try:
      preflight.resolve(c, num_devices)
    except ConfigError as e:
      raise ConfigError(e.key, e.value, f"{e.why} (in sweep run {name})") from None


def main(argv: list[str]) -> None:
  del argv
  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), None)
  if not (config_arg and FLAGS.sweep and FLAGS.workdir):
    raise ConfigError("--config / --sweep / --workdir", None, "sweep needs all three (--workdir: the runs' base folder)")
  extra = [a for a in sys.argv[2:] if a.startswith("--config.")]
  runs = commands(config_arg, FLAGS.sweep, FLAGS.workdir, extra)
  if FLAGS.launcher == "local":  # slurm runs see other devices: their own `nextlat train` validates
    import jax
    check_runs(FLAGS.config, list(zip((n for n, _ in runs), load_sweep(FLAGS.sweep))), jax.device_count())
  for k, (name, cmd) in enumerate(runs):
    line = shlex.join(cmd)
    if FLAGS.dry_run:
      print(line)
      continue
    if FLAGS.launcher == "slurm":
      rc = subprocess.run(["sbatch", f"--job-name={name}", "launch/slurm.sbatch", *cmd[1:]]).returncode
    else:
      print(f"[{name}] {line}", flush=True)
      rc = subprocess.run(cmd).returncode
    if rc:  # the run has said why on stderr above
      print(f"sweep: run {name} exited with code {rc}; {k} of {len(runs)} runs done, the other "
            f"{len(runs) - k - 1} not started", file=sys.stderr)
      sys.exit(rc if rc > 0 else 1)
