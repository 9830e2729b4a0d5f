"""The `nextlat` command: `nextlat <command> --flags`; `nextlat <command> --help` lists a command's flags."""
from __future__ import annotations

import difflib
import importlib
import logging as std_logging
import os
import sys
from typing import Callable

import ml_collections
from absl import app, flags, logging

from nextlat_jax import cli_flags
from nextlat_jax.errors import fail

# command -> (module:function taking argv, help). A command module defines its own absl flags at import
# time; only the chosen command's module is imported. The shared flags are in nextlat_jax.cli_flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("nextlat_jax.cli:train",
              "train --config=configs/x.py --workdir=DIR [--config.model.n_layer=2 ...]\n"
              "resumes from DIR's newest valid checkpoint; SIGTERM saves and exits 0"),
    "eval": ("nextlat_jax.eval.cli:command",
             "eval --workdir=DIR [--step=N] [--metrics=default|all|NAME,...]: restore the parameters only, on\n"
             "this machine's devices: held-out loss / perplexity and effective rank (DIR/eval_<step>.json);\n"
             "--metrics=all adds the task's metrics (DIR/eval/)"),
    "prepare": ("nextlat_jax.data.prepare_cli:main", "prepare --input=... --output=DIR: tokenize + pack a corpus into ArrayRecord shards"),
    "generate": ("nextlat_jax.decoding.cli:generate", "generate --workdir=DIR --prompt=... [--speculative --policy=...]: sample from a run (KV cache; self-speculative with --speculative)"),
    "info": ("nextlat_jax.info:main", "info --config=...: parameter counts (training / inference) and FLOPs per token, as JSON"),
    "compile-check": ("nextlat_jax.compile_check:main",
                      "compile-check --config=... --mesh=D,F,T: compile the full-size train step on a\n"
                      "simulated CPU mesh (nothing allocated) and print per-device memory"),
    "sweep": ("nextlat_jax.sweep:main",
              "sweep --config=... --sweep=configs/sweeps/x.py --workdir=BASE [--dry_run] [--launcher=local|slurm]:\n"
              "expand a product / zip of overrides into named runs and launch them"),
    "bench": ("nextlat_jax.bench:main", "bench step|decode|checkpoint|data ...: train-step time vs FLOPs (GPT vs NextLat d=1,2,8),\n"
              "decoding speed, checkpoint and data throughput (`nextlat bench --help` lists their settings)"),
    "lm-eval": ("nextlat_jax.interop.lm_eval_backend:lm_eval_command", "lm-eval --workdir=DIR --tasks=lambada_openai,piqa [--limit=N]: lm-evaluation-harness on the trunk (DIR/lm_eval/results_step<N>.json)"),
    "export-hf": ("nextlat_jax.interop.export_hf:export_command", "export-hf --workdir=DIR --out=HF_DIR [--step=N]: the trunk as a Hugging Face LlamaForCausalLM folder"),
    "import-hf": ("nextlat_jax.interop.import_hf:import_command", "import-hf --hf_dir=HF_DIR --out=DIR --config=...: a step-0 checkpoint whose trunk is the HF Llama (start with checkpoint.restore_from=DIR)"),
}
# command (or "command subcommand") -> the shared flags (nextlat_jax.cli_flags) it reads; only these are
# defined when it runs, so its --help lists them and no other command's.
TAKES: dict[str, tuple[str, ...]] = {
    "train": ("config", "workdir", *cli_flags.DISTRIBUTED),
    "eval": ("workdir", "step"),
    "prepare": (),
    "generate": ("workdir", "step"),
    "info": ("config",),
    "compile-check": ("config",),
    "sweep": ("config", "workdir"),
    "bench": (),
    "bench step": ("config", "workdir"),
    "bench decode": ("workdir", "step"),
    "bench checkpoint": ("config", "workdir"),
    "bench data": ("workdir",),
    "lm-eval": ("workdir", "step"),
    "export-hf": ("workdir", "step", "out"),
    "import-hf": ("config", "out"),
}


def usage() -> str:
  lines = ["nextlat: NextLat (next-latent prediction) transformers in JAX.", "",
           "usage: nextlat <command> [--flags]", "", "commands:"]
  for name, (_, text) in COMMANDS.items():
    first, *rest = text.split("\n")
    lines.append(f"  {name:<14}{first}")
    lines += [f"  {'':<14}{r}" for r in rest]
  lines += ["", "`nextlat <command> --help` shows the command's flags."]
  return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def train(argv: list[str]) -> None:
  del argv
  from nextlat_jax.train import trainer
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  trainer.train(FLAGS.config, FLAGS.workdir)


def _command(name: str, sub: str | None) -> tuple[Callable[[list[str]], None], list[str]]:
  """(the command's function, the modules whose flags are its own): imports the command's module (it
  defines the command's flags) and, for `command sub` (e.g. `bench step`), the sub-command's module."""
  module_name, fn_name = COMMANDS[name][0].split(":")
  if module_name == "nextlat_jax.cli":  # this module, also when run as `python -m nextlat_jax.cli`
    return globals()[fn_name], [cli_flags.__name__]
  module = importlib.import_module(module_name)
  modules = [cli_flags.__name__, module_name]
  subs = getattr(module, "SUBCOMMANDS", None) or {}
  if sub in subs:
    importlib.import_module(subs[sub])
    modules.append(subs[sub])
  return getattr(module, fn_name), modules


def _sub(name: str, args: list[str]) -> str | None:
  """The sub-command (`bench step`: "step") when the command has one and args start with it."""
  return args[0] if args and f"{name} {args[0]}" in TAKES else None


def help_text(name: str, modules: list[str], subs: tuple[str, ...] = ()) -> str:
  """`nextlat <name> --help`: its usage line and its flags (the shared ones it reads, then its own);
  `subs`: its sub-commands, when none was given."""
  lines = []
  for m in dict.fromkeys(modules):
    lines += FLAGS.module_help(m).strip("\n").split("\n")[1:]  # module_help's first line names the module
  out = [f"nextlat {COMMANDS[name][1]}", "", *(["flags:", *lines] if lines else ["(no flags)"])]
  if subs:
    out += ["", f"sub-commands: {', '.join(subs)} (`nextlat {name} <sub-command> --help` lists its flags)"]
    describe = getattr(sys.modules.get(modules[-1]), "describe_subcommands", None)  # e.g. nextlat_jax.bench
    out += ["", *describe()] if describe else []
  return "\n".join(out) + "\n"


def _run(fn):
  def wrapped(argv: list[str]) -> None:
    from nextlat_jax.config import ConfigError
    from nextlat_jax.train.checkpoint import SaveError
    from nextlat_jax.train.interrupts import Interrupted
    from nextlat_jax.train.interrupts import TrainingStopped
    logging.set_verbosity(logging.WARNING)  # library chatter (orbax, jax) off; ours on:
    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    ours = std_logging.getLogger("nextlat_jax")
    ours.addHandler(handler)
    ours.setLevel(std_logging.INFO)
    ours.propagate = False
    if "distributed" in FLAGS and (FLAGS.distributed or FLAGS.coordinator_address):
      from nextlat_jax.parallel import distributed
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
      fn(argv)
    except ConfigError as e:  # a user error: one line, no traceback
      print(str(e), file=sys.stderr)
      sys.exit(2)
    except app.UsageError as e:  # a missing or bad flag: one line, not absl's page of flag help
      fail(f"{argv[0]}: {e}" + ("" if "--help" in str(e) else f" (`{argv[0]} --help` lists its flags)"))
    except (TrainingStopped, SaveError) as e:
      print(f"training stopped: {e}", file=sys.stderr)
      sys.exit(1)
    except Interrupted as e:  # Ctrl-C, after the save
      print(str(e), file=sys.stderr)
      sys.exit(130)
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside training): no save, no traceback
      print("aborted (Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
      sys.exit(130)
  return wrapped


def _config_arg(args: list[str]) -> str | None:
  """The --config value in raw args (the one absl loads)."""
  return cli_flags.flag_value(args, "config")


def _check_config_file(name: str, args: list[str]) -> None:
  """A --config path that is not a file: one line naming it (ml_collections would defer the error to a
  traceback at the first access of the config)."""
  value = _config_arg(args)
  if value is not None and not os.path.isfile(value.split(":", 1)[0]):
    fail(f"nextlat {name}: --config={value}: no such config file {value.split(':', 1)[0]!r}")


def _innermost_message(e: BaseException) -> str:
  """The message of `e`, unwrapping exceptions passed as the first argument (AttributeError(KeyError(msg)))."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def _flags_parser(name: str):
  """absl's flag parsing, with the user's mistakes (an unknown flag or config key, a bad value, an
  unloadable config file) as one line and exit status 2 instead of a traceback or a page of help."""
  def parse(args: list[str]) -> list[str]:
    try:
      rest = FLAGS(args)
    except (KeyError, AttributeError) as e:  # --config.<unknown key>=...: ml_collections' error (a parent
      key, *hint = _innermost_message(e).split("\n")  # key: KeyError, a leaf: AttributeError(KeyError))
      arg = next((a for a in args[1:] if a.startswith("--config.")
                  and key.strip("'\"") in a.split("=", 1)[0].split(".")[1:]), None)
      if arg is None:  # not an override's key (e.g. raised by the config file itself)
        _config_file_failure(name, args, e)
        raise
      fail(f"nextlat {name}: {arg.split('=', 1)[0]}: unknown config key {key}"
           + (f" ({hint[0].strip()})" if hint and hint[0].strip() else ""))
    except OSError as e:  # a config file that exists but does not load
      fail(f"nextlat {name}: --config={_config_arg(args)}: {str(e).splitlines()[0]}")
    except flags.Error as e:  # unknown flag, bad value; a config file's own error is its last line
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      fail(f"nextlat {name}: {lines[0] if len(lines) == 1 else lines[0] + ' ' + lines[-1]}")
    except Exception as e:  # the config file's own mistake (syntax, import, its code): one line; else raised
      _config_file_failure(name, args, e)
      raise
    config = FLAGS["config"].value if "config" in FLAGS else None
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      fail(f"nextlat {name}: --config={_config_arg(args)}: get_config() returned {type(config).__name__}, "
           "not a ConfigDict")
    return rest
  return parse


def _config_file_failure(name: str, args: list[str], error: BaseException) -> None:
  """Exits with one line (status 2) when `error` is the --config file's own mistake; returns otherwise."""
  from nextlat_jax.config import user_file_error
  value = _config_arg(args)
  if value is None:
    return
  why = user_file_error(error, value.split(":", 1)[0])
  if why is None and isinstance(error, AttributeError) and "get_config" in str(error):
    why = "defines no get_config()"
  if why is not None:
    fail(f"nextlat {name}: --config={value}: {why}")


def main() -> None:
  argv = sys.argv
  wants_help = len(argv) >= 2 and argv[1] in ("-h", "--help", "help")
  if len(argv) < 2 or wants_help:
    print(usage(), file=sys.stdout if wants_help else sys.stderr)
    sys.exit(0 if wants_help else 2)
  command = argv[1]
  if command not in COMMANDS:
    close = difflib.get_close_matches(command, COMMANDS, n=1)
    print(f"nextlat: unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
          f"usage: nextlat <command> [--flags]; commands: {', '.join(COMMANDS)}; `nextlat --help` "
          "describes them", sep="\n", file=sys.stderr)
    sys.exit(2)
  if command == "compile-check":  # the fake device count must be set before JAX starts
    from nextlat_jax.compile_check import simulate_devices
    simulate_devices(argv[2:])
  sub = _sub(command, argv[2:])
  takes = TAKES[f"{command} {sub}" if sub else command]
  cli_flags.keep_only(takes)
  fn, modules = _command(command, sub)
  if any(a in ("-h", "--help", "--helpshort") for a in argv[2:]):
    subs = () if sub else tuple(k.split(" ", 1)[1] for k in TAKES if k.startswith(f"{command} "))
    print(help_text(command, modules, subs), end="")
    sys.exit(0)
  if "config" in takes:
    _check_config_file(command, argv[2:])
  # absl parses the flags; the command (and a sub-command such as `bench step`) stay positional.
  app.run(_run(fn), argv=[f"nextlat {command}"] + argv[2:], flags_parser=_flags_parser(command))


if __name__ == "__main__":
  main()
