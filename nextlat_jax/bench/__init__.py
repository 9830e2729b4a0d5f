"""Benchmarks: `nextlat bench <name> --flags`. Each prints medians and ratios measured in one run.

`nextlat bench --help` lists the sub-commands and their settings (describe_subcommands); `nextlat bench
<name> --help` lists one sub-command's flags.
"""
from __future__ import annotations

import importlib

from absl import app, flags

# name -> module with `command(argv)`; argv[0] is the benchmark's name.
BENCHES = {
    "step": "nextlat_jax.bench.step",
    "decode": "nextlat_jax.bench.decode",
    "checkpoint": "nextlat_jax.bench.checkpoint",
    "data": "nextlat_jax.bench.data",
}
SUBCOMMANDS = BENCHES  # the CLI imports `bench <name>`'s module before parsing, so its flags exist
# name -> (its usage line, how its settings are given: "config" (config.bench.<key>), "positional"
# (key=value arguments) or "flags").
USAGE: dict[str, tuple[str, str]] = {
    "step": ("bench step --config=configs/bench_step.py [--workdir=DIR]: GPT vs NextLat d=1,2,8 (and the "
             "baselines) train-step time and FLOP ratios; settings: --config.bench.<key>=...", "config"),
    "decode": ("bench decode --workdir=DIR [--step=N] [key=value ...]: self-speculative vs autoregressive "
               "decoding speed; settings: positional key=value", "positional"),
    "checkpoint": ("bench checkpoint --config=... [--workdir=DIR]: the blocking part of an async save vs the "
                   "train step time; settings: flags", "flags"),
    "data": ("bench data [--workdir=DIR]: input pipeline tokens/s vs a GPT-124M train step's; settings: flags",
             "flags"),
}


def settings(name: str) -> list[tuple[str, str, str]]:
  """(setting as typed, its default, its help) of sub-command `name` (imports its module)."""
  module = importlib.import_module(BENCHES[name])
  kind = USAGE[name][1]
  if kind == "config":
    return [(f"--config.bench.{k}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v), "")
            for k, v in module.BENCH_DEFAULTS.items()]
  if kind == "positional":
    return [(k, str(v), "") for k, v in module.DEFAULTS.items()]
  own = flags.FLAGS.flags_by_module_dict().get(BENCHES[name], [])
  return [(f"--{f.name}", str(f.default), f.help) for f in own]


def describe_subcommands() -> list[str]:
  """The lines of `nextlat bench --help` after its flags: each sub-command, its usage and settings."""
  lines = ["sub-commands and their settings (defaults):"]
  for name, (usage, _) in USAGE.items():
    lines.append(f"  {usage}")
    lines += [f"      {key}={default}" + (f"  ({text})" if text else "") for key, default, text in settings(name)]
  return lines


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in BENCHES:
    raise app.UsageError(f"usage: nextlat bench <{'|'.join(BENCHES)}> --flags (`nextlat bench --help` lists "
                         "their settings)")
  importlib.import_module(BENCHES[argv[1]]).command(argv[1:])
