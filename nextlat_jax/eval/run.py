"""Task metrics of a restored run (`nextlat eval`): the metrics registered for its data
(nextlat_jax.eval.TASK_METRICS) plus effective rank, written to DIR/eval/<task>.json with PNG plots.

`TaskRun` is what a registered metric function receives: the loaded run (nextlat_jax.run.load_run: the
resolved config, the objective and its params on this machine's mesh) and jitted model helpers (`lm()`
for decoding and teacher forcing, `scorer()` for perplexities, `hidden()` for rank and probes). Task
metrics run in a single process (the model work is jitted over the local mesh; the bookkeeping is on the host).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import json
import logging
import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nextlat_jax.data.packing import segment_ids_and_positions
from nextlat_jax.decoding import kv_cache
from nextlat_jax.eval import TASK_METRICS, WALK_TASKS
from nextlat_jax.eval import plots
from nextlat_jax.eval.metrics import rank as rank_lib
from nextlat_jax.models.transformer import DTYPES, ModelConfig, Transformer, unembed
from nextlat_jax.run import Run, load_run

log = logging.getLogger(__name__)
NEXT_TOKEN_OBJECTIVES = ("gpt", "nextlat")  # next-token logits = head(trunk h), as kv_cache computes


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id"))
def _teacher_force(trunk: Any, tokens_BxT: jax.Array, *, cfg: ModelConfig, eos_id: int):
  segment_BxT, position_BxT = segment_ids_and_positions(tokens_BxT, eos_id)
  h_BxTxD, _ = Transformer(cfg).apply({"params": trunk}, tokens_BxT, segment_BxT, position_BxT)
  logits_BxTxV = unembed(h_BxTxD[:, :-1], trunk["head"], DTYPES[cfg.dtype]).astype(jnp.float32)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  return jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32), logp_BxT


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id", "size"))
def _start(trunk: Any, prompt_BxP: jax.Array, len_B: jax.Array, *, cfg: ModelConfig, eos_id: int, size: int):
  h_BxPxD, cache = kv_cache.prefill(trunk, cfg, prompt_BxP, len_B, eos_id, size)
  h_BxD = jnp.take_along_axis(h_BxPxD, jnp.maximum(len_B - 1, 0)[:, None, None], axis=1)[:, 0]
  return cache, jax.nn.log_softmax(kv_cache.logits_at(trunk, cfg, h_BxD), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id"), donate_argnums=1)
def _step(trunk: Any, cache: kv_cache.Cache, tokens_B: jax.Array, *, cfg: ModelConfig, eos_id: int):
  h_Bx1xD, cache = kv_cache.extend(trunk, cfg, cache, tokens_B[:, None], eos_id)
  return cache, jax.nn.log_softmax(kv_cache.logits_at(trunk, cfg, h_Bx1xD[:, 0]), axis=-1)


class TrainedLM:
  """A GPT / NextLat checkpoint as a world_model.LM: KV-cache decoding, full-forward teacher forcing."""

  def __init__(self, params: Any, config: ml_collections.ConfigDict):
    name = config.objective.name
    if name not in NEXT_TOKEN_OBJECTIVES:
      raise ValueError(f"objective.name={name!r}: decoding metrics need next-token logits from the trunk's "
                       f"head; supported objectives: {NEXT_TOKEN_OBJECTIVES}")
    self.trunk, self.cfg = params["trunk"], ModelConfig.from_config(config.model)
    self.eos_id, self.vocab_size = int(config.data.eos_id), self.cfg.vocab_size

  def start(self, prompt_BxP: np.ndarray, len_B: np.ndarray, max_new: int):
    size = 64  # cache slots: a power of two, to bound the recompiles
    while size < prompt_BxP.shape[1] + max_new + 1:
      size *= 2
    state = _start(self.trunk, jnp.asarray(prompt_BxP), jnp.asarray(len_B), cfg=self.cfg, eos_id=self.eos_id,
                   size=size)
    return state[0], np.asarray(state[1])

  def step(self, cache: kv_cache.Cache, tokens_B: np.ndarray):
    cache, logp_BxV = _step(self.trunk, cache, jnp.asarray(tokens_B, jnp.int32), cfg=self.cfg, eos_id=self.eos_id)
    return cache, np.asarray(logp_BxV)

  def teacher_force(self, tokens_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    argmax, logp = _teacher_force(self.trunk, jnp.asarray(tokens_BxT, jnp.int32), cfg=self.cfg,
                                  eos_id=self.eos_id)
    return np.asarray(argmax), np.asarray(logp)

  def scorer(self, tokens_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """perplexity.Scorer: (log p of each next token, whether it is the argmax), both (B, T-1)."""
    argmax, logp = self.teacher_force(tokens_BxT)
    return logp, argmax == np.asarray(tokens_BxT)[:, 1:]


class ForwardLM:
  """Any objective as a world_model.LM through its next-token logits (nextlat_jax.eval.metrics.
  next_token_logits: MTP's head 0, JTP's Fetch slot 0, BST's forward state ...): one full forward over a
  static-width buffer per new token (no KV cache). Batch sizes must divide by the mesh's batch axes."""

  def __init__(self, config: ml_collections.ConfigDict, objective: Any, params: Any):
    from nextlat_jax.eval import metrics as shared
    self.config, self.objective, self.params = config, objective, params
    self.eos_id, self.vocab_size = int(config.data.eos_id), int(config.model.vocab_size)
    self._place = functools.partial(shared.place_rows, config, objective)

    def logits(params, tokens_BxT):
      segment_BxT, position_BxT = segment_ids_and_positions(tokens_BxT, self.eos_id)
      return shared.next_token_logits(config, objective, params, tokens_BxT, segment_BxT,
                                      position_BxT).astype(jnp.float32)

    def logp_at(params, tokens_BxS, idx_B):
      logits_BxV = jnp.take_along_axis(logits(params, tokens_BxS), idx_B[:, None, None], axis=1)[:, 0]
      return jax.nn.log_softmax(logits_BxV, axis=-1)

    def teacher_force(params, tokens_BxT):
      logits_BxTxV = logits(params, tokens_BxT)[:, :-1]
      logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
      logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
      return jnp.argmax(logits_BxTxV, axis=-1).astype(jnp.int32), logp_BxT

    self._logp_at = shared.make_jit(objective, logp_at)
    self._teacher_force = shared.make_jit(objective, teacher_force)

  def start(self, prompt_BxP: np.ndarray, len_B: np.ndarray, max_new: int):
    size = 64
    while size < prompt_BxP.shape[1] + max_new + 1:
      size *= 2
    buf_BxS = np.zeros((prompt_BxP.shape[0], size), np.int32)
    buf_BxS[:, :prompt_BxP.shape[1]] = prompt_BxP
    n_B = np.asarray(len_B, np.int32).copy()
    return (buf_BxS, n_B), self._logp(buf_BxS, n_B - 1)

  def step(self, state, tokens_B: np.ndarray):
    buf_BxS, n_B = state
    buf_BxS[np.arange(len(n_B)), n_B] = tokens_B
    n_B = n_B + 1
    return (buf_BxS, n_B), self._logp(buf_BxS, n_B - 1)

  def _logp(self, buf_BxS: np.ndarray, idx_B: np.ndarray) -> np.ndarray:
    return np.asarray(self._logp_at(self.params, self._place(buf_BxS), self._place(idx_B)))

  def teacher_force(self, tokens_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    argmax, logp = self._teacher_force(self.params, self._place(np.asarray(tokens_BxT, np.int32)))
    return np.asarray(argmax), np.asarray(logp)

  def scorer(self, tokens_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    argmax, logp = self.teacher_force(tokens_BxT)
    return logp, argmax == np.asarray(tokens_BxT)[:, 1:]


@dataclasses.dataclass
class TaskRun:
  """A loaded run (nextlat_jax.run.Run) and the eval settings, as a registered task metric receives it."""
  run: Run
  out_dir: str  # DIR/eval
  num_samples: int | None = None  # None: each metric's spec count
  batch_size: int = 256  # rows per jitted model call
  seed: int = 0
  show_progress: bool = True
  families: tuple[str, ...] | None = None  # the task's metric families to run (None: all of them)
  options: dict = dataclasses.field(default_factory=dict)  # task options (corpus paths, probe steps, ...)

  @property
  def workdir(self) -> str:
    return self.run.workdir

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The run's resolved config."""
    return self.run.config

  @property
  def params(self) -> Any:
    return self.run.params

  @property
  def step(self) -> int:
    return self.run.step

  @property
  def objective(self) -> Any:
    return self.run.objective

  def progress(self, iterable, desc: str | None = None, total: int | None = None):
    """A tqdm progress bar with ETA over `iterable` (silent when show_progress is off)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not self.show_progress, leave=True, dynamic_ncols=True)

  def lm(self) -> TrainedLM | ForwardLM:
    """GPT / NextLat: KV-cache decoding; other objectives: a full forward per token."""
    if self.config.objective.name in NEXT_TOKEN_OBJECTIVES:
      return TrainedLM(self.params, self.config)
    return ForwardLM(self.config, self.objective, self.params)

  @property
  def row_multiple(self) -> int:
    """Batch sizes must be multiples of this (the mesh's batch axes)."""
    from nextlat_jax.eval import metrics as shared
    return shared.data_parallel_size(self.objective)

  def scorer(self):
    return self.lm().scorer

  @functools.cached_property
  def _hidden_jit(self):
    return jax.jit(self.objective.hidden, in_shardings=(self.run.param_shardings, self.run.batch_sharding))

  def hidden(self, batch: dict) -> np.ndarray:
    """The objective's representation h (B, T, D) of a batch (B divisible by the mesh's batch axes)."""
    arrays = {k: np.asarray(batch[k], np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    return np.asarray(self._hidden_jit(self.params, arrays), np.float32)

  def batches(self, split: str, n: int, rows: int, data_cfg: ml_collections.ConfigDict | None = None,
              allow_fewer: bool = False):
    """The first n batches of `rows` rows of a split of the run's data (or of data_cfg), lazily."""
    from nextlat_jax.data import pipeline
    ds = pipeline.make_dataset(data_cfg or self.config.data, split=split, global_batch_size=rows,
                               seed=int(self.config.seed), process_index=0, process_count=1)
    if isinstance(ds, grain.MapDataset):
      n = min(n, len(ds)) if allow_fewer else n
      if len(ds) < n:
        raise ValueError(f"data split {split!r} has {len(ds)} batches of {rows} rows; {n} needed")
      return (ds[i] for i in range(n))
    return itertools.islice(iter(ds), n)


def rank_metrics(run: TaskRun, rows: int = 256, seq_len: int = 256, n_batches: int = 4) -> dict:
  """Effective rank of the hidden states of `n_batches` batches of `rows` held-out rows (METRICS §6);
  street-grid / Manhattan rows are regenerated at `seq_len` tokens, other data keep their rows."""
  data_cfg = ml_collections.ConfigDict(run.config.data.to_dict())
  if data_cfg.name in WALK_TASKS:
    data_cfg.seq_len = seq_len
    data_cfg.eval_rows = max(int(data_cfg.eval_rows), rows * n_batches)
  hs = []
  for batch in run.progress(run.batches("eval", n_batches, rows, data_cfg, allow_fewer=True), "effective rank",
                            total=n_batches):
    T = batch["tokens"].shape[1] - 1
    h_BxTxD = run.hidden(batch)[:, :T]
    keep_BxT = np.asarray(batch["segment_ids"])[:, :T] >= 0  # padding is not a hidden state
    hs.append(h_BxTxD[keep_BxT])
  out = rank_lib.erank_of_batches(hs)
  out.update(rows_per_batch=rows, tokens_per_batch=int(hs[0].shape[0]))
  return out


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(_jsonable(obj), f, indent=2)


def metric_function(task: str):
  """The registered metric function of `task` (a key of TASK_METRICS)."""
  if task not in TASK_METRICS:
    raise ValueError(f"--task={task!r}: no metrics registered; known tasks: {', '.join(sorted(TASK_METRICS))}")
  module, fn = TASK_METRICS[task].split(":")
  return getattr(importlib.import_module(module), fn)


def metric_families(task: str) -> tuple[str, ...]:
  """The metric families `--metrics=NAME,...` can choose for `task`: its metric module's FAMILIES (e.g.
  world_model's next_token, valid_trajectories, compression, detours), else the task itself; none for a
  task without registered metrics."""
  if task not in TASK_METRICS:
    return ()
  module = importlib.import_module(TASK_METRICS[task].split(":")[0])
  return tuple(getattr(module, "FAMILIES", (task,)))


def choose_metrics(spec: str, task: str) -> tuple[tuple[str, ...], bool]:
  """`--metrics=default|all|none|NAME,...` for `task`: (the task's metric families to run, whether to run
  effective rank). default: rank only (fast); all: every family and rank; none: neither."""
  families = metric_families(task)
  if spec == "default":
    return (), True
  if spec == "all":
    return families, True
  if spec == "none":
    return (), False
  names = [n.strip() for n in spec.split(",") if n.strip()]
  known = ("rank", *families)
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f"--metrics={spec}: unknown metric {', '.join(unknown) or '(empty)'}; for task {task!r} "
                     f"choose default, all, none or a comma-separated list of {', '.join(known)}")
  return tuple(f for f in families if f in names), "rank" in names


def restore(workdir: str, step: int | None = None, **kwargs: Any) -> TaskRun:
  """load_run(workdir, step) as a TaskRun writing to DIR/eval; `kwargs`: TaskRun's settings."""
  return task_run(load_run(workdir, step), **kwargs)


def task_run(run: Run, **kwargs: Any) -> TaskRun:
  """A loaded run as a TaskRun writing to DIR/eval; `kwargs`: TaskRun's settings."""
  if jax.process_count() > 1:
    raise ValueError(f"task metrics run in one process; this job has {jax.process_count()} processes")
  out_dir = os.path.join(run.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  return TaskRun(run, out_dir=out_dir, **{"seed": int(run.config.seed), **kwargs})


def evaluate_task(workdir: str, step: int | None = None, task: str | None = None, num_samples: int | None = None,
                  *, batch_size: int = 256, rank_batches: int = 4, show_progress: bool = True,
                  options: dict | None = None, metrics: str = "all") -> dict:
  """task_metrics of the run in `workdir` at `step` (loaded here). Returns {task: metrics}."""
  return task_metrics(load_run(workdir, step), task, num_samples, batch_size=batch_size,
                      rank_batches=rank_batches, show_progress=show_progress, options=options, metrics=metrics)


def chosen_task(config: ml_collections.ConfigDict, task: str | None = None) -> str:
  """The task whose metrics eval runs: `task`, else the run's eval_task (e.g. TinyStories), else data.name."""
  return task or config.get("eval_task") or str(config.data.name)


def task_metrics(loaded: Run, task: str | None = None, num_samples: int | None = None, *, batch_size: int = 256,
                 rank_batches: int = 4, show_progress: bool = True, options: dict | None = None,
                 metrics: str = "all") -> dict:
  """Runs the metric families chosen by `metrics` (choose_metrics: default|all|none|NAME,...) of the
  metrics registered for the run's data.name (or `task`; "rank": rank only) and effective rank; writes
  DIR/eval/<task>.json, DIR/eval/rank.json and PNGs. Returns {task: metrics}."""
  if num_samples is not None and num_samples < 1:
    raise ValueError(f"--num_samples={num_samples}: must be >= 1")
  chosen = chosen_task(loaded.config, task)
  if task is not None and task != "rank":
    metric_function(task)  # an unknown --task: one error naming the known ones
  families, with_rank = choose_metrics(metrics, chosen)
  run = task_run(loaded, num_samples=num_samples, batch_size=batch_size, show_progress=show_progress,
                 options=dict(options or {}), families=families)
  results: dict[str, dict] = {}
  if families:
    log.info("task metrics of %s: %s", chosen, ", ".join(families))
    results[chosen] = {"step": run.step, **metric_function(chosen)(run)}
    write_json(os.path.join(run.out_dir, f"{chosen}.json"), results[chosen])
  elif chosen != "rank" and chosen not in TASK_METRICS:
    log.info("no task metrics registered for data.name=%r; effective rank only", chosen)
  elif chosen != "rank" and metrics == "default":
    log.info("task metrics of %s not run (--metrics=all or --metrics=%s runs them)", chosen,
             ",".join(metric_families(chosen)))
  if with_rank:
    try:
      results["rank"] = {"step": run.step, **rank_metrics(run, n_batches=rank_batches)}
    except ValueError as e:  # e.g. a held-out split of fewer than 256 rows: the task metrics still count
      log.warning("effective rank skipped: %s", e)
      results["rank"] = {"step": run.step, "skipped": str(e)}
    write_json(os.path.join(run.out_dir, "rank.json"), results["rank"])
    if "spectrum" in results["rank"]:
      plots.spectrum(results["rank"]["spectrum"], os.path.join(run.out_dir, "spectrum.png"),
                     title=f"singular values (erank {results['rank']['erank']:.1f})")
  metrics_path = os.path.join(run.workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    plots.training_curves(metrics_path, os.path.join(run.out_dir, "training_curves.png"))
  log.info("task metrics of step %d written to %s", run.step, run.out_dir)
  return results
