"""`nextlat eval --workdir=DIR [--step=N] [--metrics=default|all|none|NAME,...]`: the held-out loss and
perplexity of a run's checkpoint (DIR/eval_<step>.json), then effective rank and the task metrics chosen by
--metrics among those registered for its data (nextlat_jax.eval.TASK_METRICS), in DIR/eval/. The run is
loaded once (nextlat_jax.run.load_run) for all of them.

The command module: it defines the eval flags, so only `nextlat eval` imports it (the CLI's shared
--workdir and --step come from nextlat_jax.cli_flags).
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from nextlat_jax.errors import ConfigError, need
from nextlat_jax.eval import WALK_TASKS

flags.DEFINE_integer("eval_steps", None, "Held-out batches (default: the run's eval_steps).")
flags.DEFINE_string("metrics", "default", "Metrics after the held-out loss / perplexity: 'default': effective "
                    "rank only (seconds); 'all': rank and every metric family of the task; 'none'; or NAME,... of "
                    "rank and the task's families (street_grid / manhattan: next_token, valid_trajectories, "
                    "compression, detours; other tasks: the task's name, e.g. path_star). Long metrics show a "
                    "progress bar with ETA.")
flags.DEFINE_string("task", None, "The task metrics to run (default: the run's eval_task, else its data.name; "
                    "'rank': effective rank only; 'perplexity', 'probes').")
flags.DEFINE_integer("num_samples", None, "Size of each task metric (default: the spec's counts): "
                     "street_grid / manhattan: pairs for valid_trajectories (6,400), walks for next_token (1,000), "
                     "trials for compression and detours (100 each); path_star / countdown / a5: test examples; "
                     "hmm: held-out rows; perplexity: held-out rows (and WikiText pages / LAMBADA passages).")
flags.DEFINE_integer("eval_batch_size", 256, "Rows per jitted model call in task metrics.")
flags.DEFINE_integer("rank_batches", 1, "Batches of 256 held-out rows for effective rank (1: the paper's single "
                     "batch, seconds; 4: the reference's mean over batches).")
flags.DEFINE_integer("max_hops", 48, "street_grid / manhattan: evaluation pairs have a shortest path of at most "
                     "this many hops (48: the reference; 50: the paper's text).")
flags.DEFINE_string("wikitext_path", None, "--task=perplexity: WikiText test pages (parquet/jsonl/raw).")
flags.DEFINE_string("lambada_path", None, "--task=perplexity: LAMBADA passages (jsonl/parquet).")
flags.DEFINE_string("probe_reference", None, "--task=probes: the GPT run (workdir) whose probe CE is subtracted "
                    "(CE difference by offset).")
flags.DEFINE_integer("probe_steps", 20000, "--task=probes: training steps per probe set.")
FLAGS = flags.FLAGS

# integer flag -> its least value (None, where a flag allows it, keeps its default)
INT_FLAG_MINIMUMS = {"eval_steps": 1, "num_samples": 1, "eval_batch_size": 1, "rank_batches": 1, "max_hops": 1,
                     "probe_steps": 1}
# --task -> the data.name values of the runs it can evaluate (its metrics read that data's own config);
# the other tasks (perplexity, probes, ...) fit any run
DATA_TASKS = {"street_grid": WALK_TASKS, "manhattan": WALK_TASKS, "path_star": ("path_star",),
              "countdown": ("countdown",), "a5": ("a5",), "hmm": ("hmm",)}


def options_from_flags() -> dict:
  """Task options from the flags above (for TaskRun.options)."""
  return {"wikitext_path": FLAGS.wikitext_path, "lambada_path": FLAGS.lambada_path,
          "probe_reference": FLAGS.probe_reference, "probe_steps": FLAGS.probe_steps,
          "world_model": {"max_hops": FLAGS.max_hops}}


def check_flags() -> None:
  """ConfigError for the first bad integer flag or unknown --task: nothing of the run is read."""
  from nextlat_jax.eval import TASK_METRICS
  for name, least in INT_FLAG_MINIMUMS.items():
    value = FLAGS[name].value
    default = "; leave it out for the run's default" if FLAGS[name].default is None else ""
    need(value is None or value >= least, f"--{name}", value, f"must be >= {least}{default}")
  task = FLAGS.task
  need(task is None or task == "rank" or task in TASK_METRICS, "--task", task,
       f"no metrics registered; known tasks: {', '.join(sorted({'rank', *TASK_METRICS}))}")


def check_run_flags(workdir: str, step: int | None) -> None:
  """ConfigError unless --task fits the run's data and --metrics names metrics of the chosen task; reads
  only the run's saved config (no parameters)."""
  from nextlat_jax.eval import run as eval_run
  from nextlat_jax.run import run_config
  config = run_config(workdir, step)
  data_name = str(config.data.name)
  task = FLAGS.task
  if task in DATA_TASKS:
    need(data_name in DATA_TASKS[task], "--task", task, f"needs a run trained on {' or '.join(DATA_TASKS[task])} "
         f"data; this run's data.name is {data_name!r}")
  chosen = eval_run.chosen_task(config, task)
  try:
    eval_run.choose_metrics(FLAGS.metrics, chosen)
  except ValueError as e:
    raise ConfigError("--metrics", FLAGS.metrics, str(e).removeprefix(f"--metrics={FLAGS.metrics}: ")) from None


def command(argv: list[str]) -> None:
  """`nextlat eval`: held-out loss (DIR/eval_<step>.json), then the chosen task metrics (DIR/eval/)."""
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("eval needs --workdir")
  check_flags()  # user mistakes first: before the run is read, compiled or evaluated, nothing written
  check_run_flags(FLAGS.workdir, FLAGS.step)
  from nextlat_jax.run import load_run
  from nextlat_jax.train import evaluate as evaluate_lib
  run = load_run(FLAGS.workdir, FLAGS.step)
  result = evaluate_lib.evaluate_loaded(run, FLAGS.eval_steps)
  print(json.dumps(result), flush=True)
  if FLAGS.metrics == "none":
    return
  from nextlat_jax.eval import run as eval_run
  try:
    tasks = eval_run.task_metrics(run, FLAGS.task, FLAGS.num_samples, batch_size=FLAGS.eval_batch_size,
                                  rank_batches=FLAGS.rank_batches, options=options_from_flags(),
                                  metrics=FLAGS.metrics)
  except ValueError as e:  # bad task flags or data: one line, no traceback
    print(f"nextlat eval: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, (list, dict))} for k, r in tasks.items()}))
