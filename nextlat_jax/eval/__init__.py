"""Task metrics on restored checkpoints (`nextlat eval`), by the run's `data.name`.

TASK_METRICS maps a data source name (or a task name given with --task) to "module:function". The
function takes one argument, a `nextlat_jax.eval.run.TaskRun` (the resolved config, the objective, the
restored params and step, the mesh, the output folder DIR/eval, the sample budget `num_samples`, a
seed, task `options` and jitted model helpers), and returns a JSON-ready dict of metrics; it may write
PNGs into `run.out_dir`. `evaluate_task` writes the dict to DIR/eval/<task>.json. Effective rank runs
for every task (DIR/eval/rank.json, spectrum.png).

The `nextlat eval` command and its flags are in nextlat_jax.eval.cli; this package module defines no
flags and imports nothing.
"""

WALK_TASKS = ("street_grid", "manhattan")  # random walks on a street graph: one world model, either data

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
