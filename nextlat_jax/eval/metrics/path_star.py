"""Path-Star exact-path accuracy (METRICS.md section 8; Bachmann & Nagarajan 2024).

From the prompt ending at `=`, generate l tokens; a test graph is solved iff all l equal the true path
(source .. goal). Reported for greedy decoding (the original benchmark) and sampling at temperature 1
(the reference's evaluator), as percentages over all requested test graphs (no batch is dropped), with
the per-position token accuracy: position 1 is the trivial source copy, position 2 the only hard
decision (chance about 1/d). Means and standard deviations over seeds are taken across runs.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from nextlat_jax.data.tasks import path_star
from nextlat_jax.eval.metrics import make_completer, map_batches

TEMPERATURES = (0.0, 1.0)  # greedy, and sampling at T = 1


def mode_name(temperature: float) -> str:
  return "greedy" if temperature == 0 else f"sample_t{temperature:g}"


def path_scores(generated_NxL: np.ndarray, answers_NxL: np.ndarray) -> dict[str, float | list]:
  """Exact-path accuracy and per-position token accuracy, in percent."""
  generated_NxL, answers_NxL = np.asarray(generated_NxL), np.asarray(answers_NxL)
  if generated_NxL.shape != answers_NxL.shape or generated_NxL.ndim != 2:
    raise ValueError(f"generated {generated_NxL.shape} and answers {answers_NxL.shape} must be equal (N, l)")
  same_NxL = generated_NxL == answers_NxL
  return {
      "exact_path_accuracy": 100.0 * float(np.mean(np.all(same_NxL, axis=1))),
      "token_accuracy_by_position": [100.0 * float(v) for v in np.mean(same_NxL, axis=0)],
  }


def test_rows(config: Any, num_examples: int | None) -> tuple[np.ndarray, np.ndarray, int]:
  """(prompts (N, 3E+3), answers (N, l), l) of the first num_examples test graphs (None: all)."""
  src = path_star.make_source(config.data, split="eval", seed=int(config.seed))
  n = len(src) if num_examples is None else int(num_examples)
  if not 1 <= n <= len(src):
    raise ValueError(f"num_examples={num_examples!r}: must be in [1, data.n_test={len(src)}]")
  rows = np.stack([src[i]["tokens"] for i in range(n)])
  P, l = src.prompt_len, src.path_len
  return rows[:, :P], rows[:, P:P + l], l


def evaluate(config: Any, objective: Any, params: Any, *, num_examples: int | None = None,
             batch_size: int = 256, temperatures: tuple[float, ...] = TEMPERATURES, seed: int = 0,
             progress: Any = lambda it: it) -> dict[str, float | list]:
  """Exact-path and per-position accuracy (%) on the held-out test graphs, per decoding mode."""
  prompts, answers, l = test_rows(config, num_examples)
  complete = make_completer(config, objective, l)
  key = jax.random.PRNGKey(seed)
  out: dict[str, float | list] = {"num_examples": len(prompts), "path_len": l,
                                  "chance": 100.0 / int(config.data.degree)}
  for temperature in temperatures:
    fn = lambda b, x, t=temperature: complete(params, x, jax.random.fold_in(key, b), t)
    generated = map_batches(config, objective, fn, [prompts], batch_size, progress)[0]
    for name, value in path_scores(generated, answers).items():
      out[f"{mode_name(temperature)}/{name}"] = value
  return out


def task(run: Any) -> dict[str, float | list]:
  """`nextlat eval` entry (nextlat_jax.eval.TASK_METRICS): a restored nextlat_jax.eval.run.TaskRun."""
  return evaluate(run.config, run.objective, run.params, num_examples=run.num_samples,
                  batch_size=run.batch_size, seed=run.seed, progress=lambda it: run.progress(it, "path-star"))
