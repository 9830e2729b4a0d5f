"""The `nextlat` command: `nextlat <command> --flags`; `nextlat <command> --help` lists a command's flags."""
from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

USAGE = """nextlat: NextLat (next-latent prediction) transformers in JAX.

usage: nextlat <command> [--flags]

commands:
  train         train --config=configs/x.py --workdir=DIR [--config.model.n_layer=2 ...]
                (resumes from DIR's newest valid checkpoint; SIGTERM saves and exits 0)
  eval          eval --workdir=DIR [--step=N]: restore the parameters only, on this machine's
                devices, and report held-out metrics (also written to DIR/eval_<step>.json)
  bench step    time GPT and NextLat d=1,2,8 train steps on one config; prints ratios

`nextlat <command> --help` shows the command's flags.
"""

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py, `get_config(arg)`); append ':arg' for a "
    "preset. Override any value with --config.<key>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl, tensorboard/, config.json, checkpoints/.")
flags.DEFINE_bool("distributed", False, "Join a multi-process job (jax.distributed): cluster auto-detection "
                  "(TPU pod, SLURM) unless --coordinator_address is given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")
flags.DEFINE_integer("step", None, "eval: the checkpoint step (default: the newest).")
flags.DEFINE_integer("eval_steps", None, "eval: held-out batches (default: the run's eval_steps).")


def _train(argv: list[str]) -> None:
  del argv
  from nextlat_jax.train import trainer
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  trainer.train(FLAGS.config, FLAGS.workdir)


def _eval(argv: list[str]) -> None:
  del argv
  from nextlat_jax.train import evaluate
  if FLAGS.workdir is None:
    raise app.UsageError("eval needs --workdir")
  print(json.dumps(evaluate.evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.eval_steps)))


def _bench(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] != "step":
    raise app.UsageError("usage: nextlat bench step --config=...")
  from nextlat_jax.bench import step as bench_step
  if FLAGS.config is None:
    raise app.UsageError("bench step needs --config")
  bench_step.main(FLAGS.config)


COMMANDS = {"train": _train, "eval": _eval, "bench": _bench}


def _run(fn):
  def wrapped(argv: list[str]) -> None:
    from nextlat_jax.config import ConfigError
    from nextlat_jax.train.trainer import TrainingStopped
    logging.set_verbosity(logging.WARNING)  # library chatter (orbax, jax) off; ours on:
    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    ours = std_logging.getLogger("nextlat_jax")
    ours.addHandler(handler)
    ours.setLevel(std_logging.INFO)
    ours.propagate = False
    if FLAGS.distributed or FLAGS.coordinator_address:
      from nextlat_jax.parallel import distributed
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
      fn(argv)
    except ConfigError as e:  # a user error: one line, no traceback
      print(str(e), file=sys.stderr)
      sys.exit(2)
    except TrainingStopped as e:
      print(f"training stopped: {e}", file=sys.stderr)
      sys.exit(1)
  return wrapped


def main() -> None:
  argv = sys.argv
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help") or argv[1] not in COMMANDS:
    print(USAGE, file=sys.stderr if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help") else sys.stdout)
    sys.exit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help", "help") else 2)
  command = argv[1]
  # absl parses the flags; the command (and a sub-command such as `bench step`) stay positional.
  app.run(_run(COMMANDS[command]), argv=[f"nextlat {command}"] + argv[2:])


if __name__ == "__main__":
  main()
