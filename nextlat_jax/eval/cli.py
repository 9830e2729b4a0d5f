"""`nextlat eval --workdir=DIR [--step=N]`: the held-out loss of a run's checkpoint (DIR/eval_<step>.json),
then the task metrics registered for its data (nextlat_jax.eval.TASK_METRICS) and effective rank (DIR/eval/).

The command module: it defines the eval flags, so only `nextlat eval` imports it (the CLI's shared
--workdir and --step come from nextlat_jax.cli_flags).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

flags.DEFINE_integer("eval_steps", None, "Held-out batches (default: the run's eval_steps).")
flags.DEFINE_bool("metrics", True, "Also run the task metrics registered for the run's data "
                  "(nextlat_jax.eval.TASK_METRICS) and effective rank; written to DIR/eval/.")
flags.DEFINE_string("task", None, "The task metrics to run (default: the run's eval_task, else its data.name; "
                    "'rank': effective rank only; 'perplexity', 'probes').")
flags.DEFINE_integer("num_samples", None, "Samples per task metric (default: the spec's counts, e.g. 6,400 "
                     "pairs for valid trajectories).")
flags.DEFINE_integer("eval_batch_size", 256, "Rows per jitted model call in task metrics.")
flags.DEFINE_integer("rank_batches", 4, "Batches of 256 held-out rows for effective rank (the first one is the "
                     "paper's single batch; the mean over all is the reference's).")
flags.DEFINE_integer("max_hops", 48, "street_grid / manhattan: evaluation pairs have a shortest path of at most "
                     "this many hops (48: the reference; 50: the paper's text).")
flags.DEFINE_string("wikitext_path", None, "--task=perplexity: WikiText test pages (parquet/jsonl/raw).")
flags.DEFINE_string("lambada_path", None, "--task=perplexity: LAMBADA passages (jsonl/parquet).")
flags.DEFINE_string("probe_reference", None, "--task=probes: the GPT run (workdir) whose probe CE is subtracted "
                    "(CE difference by offset).")
flags.DEFINE_integer("probe_steps", 20000, "--task=probes: training steps per probe set.")
FLAGS = flags.FLAGS


def options_from_flags() -> dict:
  """Task options from the flags above (for TaskRun.options)."""
  return {"wikitext_path": FLAGS.wikitext_path, "lambada_path": FLAGS.lambada_path,
          "probe_reference": FLAGS.probe_reference, "probe_steps": FLAGS.probe_steps,
          "world_model": {"max_hops": FLAGS.max_hops}}


def command(argv: list[str]) -> None:
  """`nextlat eval`: held-out loss (DIR/eval_<step>.json), then the task metrics (DIR/eval/)."""
  del argv
  from nextlat_jax.train import evaluate as evaluate_lib
  if FLAGS.workdir is None:
    raise app.UsageError("eval needs --workdir")
  result = evaluate_lib.evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.eval_steps)
  print(json.dumps(result))
  if not FLAGS.metrics:
    return
  from nextlat_jax.eval import run as eval_run
  try:
    tasks = eval_run.evaluate_task(FLAGS.workdir, result["step"], FLAGS.task, FLAGS.num_samples,
                                   batch_size=FLAGS.eval_batch_size, rank_batches=FLAGS.rank_batches,
                                   options=options_from_flags())
  except ValueError as e:  # bad task flags or data: one line, no traceback
    print(f"nextlat eval: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, (list, dict))} for k, r in tasks.items()}))
