"""Task metrics on restored checkpoints (`nextlat eval`), by the run's `data.name`.

TASK_METRICS maps a data source name (or a task name given with --task) to "module:function". The
function takes one argument, a `nextlat_jax.eval.run.TaskRun` (the resolved config, the objective, the
restored params and step, the mesh, the output folder DIR/eval, the sample budget `num_samples`, a
seed, task `options` and jitted model helpers), and returns a JSON-ready dict of metrics; it may write
PNGs into `run.out_dir`. `evaluate_task` writes the dict to DIR/eval/<task>.json. Effective rank runs
for every task (DIR/eval/rank.json, spectrum.png).

This module is imported by the CLI before flag parsing (it defines the `nextlat eval` flags below and
the command), so it imports nothing heavy at import time.
"""
from absl import flags

TASK_METRICS: dict[str, str] = {
    "street_grid": "nextlat_jax.eval.metrics.world_model:evaluate",
    "manhattan": "nextlat_jax.eval.metrics.world_model:evaluate",
    "perplexity": "nextlat_jax.eval.metrics.perplexity:evaluate",
    "fineweb_edu": "nextlat_jax.eval.metrics.perplexity:evaluate",
    "pretokenized": "nextlat_jax.eval.metrics.perplexity:evaluate",
    "probes": "nextlat_jax.eval.metrics.probes:evaluate",
    "path_star": "nextlat_jax.eval.metrics.path_star:task",
    "countdown": "nextlat_jax.eval.metrics.countdown:task",
    "a5": "nextlat_jax.eval.metrics.a5:task",
    "hmm": "nextlat_jax.eval.metrics.belief:task",
}

_M = "nextlat_jax.cli"  # listed by `nextlat eval --help` with the shared flags
flags.DEFINE_bool("metrics", True, "eval: also run the task metrics registered for the run's data "
                  "(nextlat_jax.eval.TASK_METRICS) and effective rank; written to DIR/eval/.", module_name=_M)
flags.DEFINE_string("task", None, "eval: the task metrics to run (default: the run's data.name; 'rank': "
                    "effective rank only; 'perplexity', 'probes').", module_name=_M)
flags.DEFINE_integer("num_samples", None, "eval: samples per task metric (default: the spec's counts, e.g. "
                     "6,400 pairs for valid trajectories).", module_name=_M)
flags.DEFINE_integer("eval_batch_size", 256, "eval: rows per jitted model call in task metrics.", module_name=_M)
flags.DEFINE_integer("rank_batches", 4, "eval: batches of 256 held-out rows for effective rank (the first one "
                     "is the paper's single batch; the mean over all is the reference's).", module_name=_M)
flags.DEFINE_integer("max_hops", 48, "eval (street_grid / manhattan): evaluation pairs have a shortest path of "
                     "at most this many hops (48: the reference; 50: the paper's text).", module_name=_M)
flags.DEFINE_string("wikitext_path", None, "eval --task=perplexity: WikiText test pages (parquet/jsonl/raw).",
                    module_name=_M)
flags.DEFINE_string("lambada_path", None, "eval --task=perplexity: LAMBADA passages (jsonl/parquet).",
                    module_name=_M)
flags.DEFINE_string("probe_reference", None, "eval --task=probes: the GPT run (workdir) whose probe CE is "
                    "subtracted (CE difference by offset).", module_name=_M)
flags.DEFINE_integer("probe_steps", 20000, "eval --task=probes: training steps per probe set.", module_name=_M)


def options_from_flags() -> dict:
  """Task options from the flags above (for TaskRun.options)."""
  f = flags.FLAGS
  return {"wikitext_path": f.wikitext_path, "lambada_path": f.lambada_path,
          "probe_reference": f.probe_reference, "probe_steps": f.probe_steps,
          "world_model": {"max_hops": f.max_hops}}


def command(argv: list[str]) -> None:
  """`nextlat eval`: held-out loss (DIR/eval_<step>.json), then the task metrics (DIR/eval/)."""
  del argv
  import json
  import sys

  from absl import app

  from nextlat_jax.train import evaluate as evaluate_lib
  f = flags.FLAGS
  if f.workdir is None:
    raise app.UsageError("eval needs --workdir")
  result = evaluate_lib.evaluate_run(f.workdir, f.step, f.eval_steps)
  print(json.dumps(result))
  if not f.metrics:
    return
  from nextlat_jax.eval import run as eval_run
  try:
    tasks = eval_run.evaluate_task(f.workdir, result["step"], f.task, f.num_samples, batch_size=f.eval_batch_size,
                                   rank_batches=f.rank_batches, options=options_from_flags())
  except ValueError as e:  # bad task flags or data: one line, no traceback
    print(f"nextlat eval: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, (list, dict))} for k, r in tasks.items()}))
