"""A5 accuracy by length (METRICS.md section 9), in two modes, on the length-test_len test words.

- `transformer`: the trunk reads the whole word; the state after g_1 .. g_L predicts acc_L through the
  head (any objective's next-token head).
- `rnn` (objectives with latent dynamics, i.e. NextLat): the trunk reads g_1 only, giving h_1; then
  h_{t+1} = p_psi(h_t, E(g_{t+1})) (`nextlat_jax.models.dynamics.dynamics_step`, one chain from h_1,
  with its carry for the "attn" kind) and acc_t is read as argmax head(h_t); the transformer is never
  called again.

acc(L) = % of words whose predicted state at position L equals acc_L; prefix accuracy(L) = % of words
whose positions 1..L are all correct (which one the paper plots is not specified: both are reported).
Percentages over every requested test word.

Training on labels: the A5 rows carry `labels` (column t's target; see nextlat_jax.data.tasks.a5).
The objectives must use them as CE targets: `targets = batch.get("labels", batch["tokens"])[:, 1:]` in
gpt.py and nextlat.py, and the train step must pass the `labels` field through (issue 5 report).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextlat_jax.data.tasks import a5
from nextlat_jax.eval.metrics import make_jit, map_batches, next_token_logits
from nextlat_jax.models.dynamics import dynamics_step, init_carry
from nextlat_jax.models.transformer import unembed


def accuracy_by_length(pred_NxL: np.ndarray, labels_NxL: np.ndarray) -> dict[str, list]:
  """Per-position and prefix accuracy (%), one entry per length L = 1..L_max."""
  correct_NxL = np.asarray(pred_NxL) == np.asarray(labels_NxL)
  return {
      "acc_by_length": [100.0 * float(v) for v in correct_NxL.mean(axis=0)],
      "prefix_acc_by_length": [100.0 * float(v) for v in np.cumprod(correct_NxL, axis=1).mean(axis=0)],
  }


def transformer_predictions(config: Any, objective: Any) -> Any:
  """Jitted (params, words_BxL) -> predicted states (B, L): the trunk reads the whole word."""
  def predict(params, words_BxL):
    B, L = words_BxL.shape
    seg = jnp.zeros((B, L), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(1, L + 1, dtype=jnp.int32), (B, L))
    return jnp.argmax(next_token_logits(config, objective, params, words_BxL, seg, pos), axis=-1).astype(jnp.int32)
  return make_jit(objective, predict)


def rnn_predictions(config: Any, objective: Any) -> Any:
  """Jitted (params, words_BxL) -> predicted states (B, L): trunk on g_1, then p_psi only."""
  trunk, dyn = objective.modules["trunk"], objective.modules["dynamics"]

  def predict(params, words_BxL):
    B = words_BxL.shape[0]
    ones = jnp.ones((B, 1), jnp.int32)
    h_Bx1xD, _ = trunk.apply({"params": params["trunk"]}, words_BxL[:, :1], ones * 0, ones)
    head_DxV = params["trunk"]["head"]

    def step(state, x_next_B):
      h_Bx1xD, carry = state
      pred_B = jnp.argmax(unembed(h_Bx1xD, head_DxV)[:, 0], axis=-1).astype(jnp.int32)
      return dynamics_step(dyn, params, h_Bx1xD, x_next_B[:, None], carry), pred_B

    (h_Bx1xD, _), preds_LxB = jax.lax.scan(step, (h_Bx1xD, init_carry(dyn, (B, 1))), words_BxL[:, 1:].T)
    last_B = jnp.argmax(unembed(h_Bx1xD, head_DxV)[:, 0], axis=-1).astype(jnp.int32)
    return jnp.concatenate([preds_LxB.T, last_B[:, None]], axis=1)
  return make_jit(objective, predict)


def modes(objective: Any) -> tuple[str, ...]:
  return ("transformer", "rnn") if "dynamics" in objective.modules else ("transformer",)


def evaluate(config: Any, objective: Any, params: Any, *, num_examples: int | None = None,
             batch_size: int = 1024, progress: Any = lambda it: it) -> dict[str, float | list]:
  """Accuracy and prefix accuracy (%) by length on the test words, per mode."""
  n = int(config.data.n_test) if num_examples is None else int(num_examples)
  words, labels = a5.test_words(config.data, n)
  k, L = int(config.data.train_len), words.shape[1]
  out: dict[str, float | list] = {"num_examples": n, "train_len": k, "test_len": L}
  for mode in modes(objective):
    predict = (transformer_predictions if mode == "transformer" else rnn_predictions)(config, objective)
    preds = map_batches(config, objective, lambda b, w: predict(params, w), [words], batch_size, progress)[0]
    scores = accuracy_by_length(preds, labels)
    for name, value in scores.items():
      out[f"{mode}/{name}"] = value
    out[f"{mode}/acc_at_train_len"] = scores["acc_by_length"][min(k, L) - 1]
    out[f"{mode}/acc_at_test_len"] = scores["acc_by_length"][L - 1]
    out[f"{mode}/prefix_acc_at_test_len"] = scores["prefix_acc_by_length"][L - 1]
  return out


def task(run: Any) -> dict[str, float | list]:
  """`nextlat eval` entry (nextlat_jax.eval.TASK_METRICS): a restored nextlat_jax.eval.run.TaskRun;
  also writes DIR/eval/a5_accuracy_by_length.png."""
  import os
  from nextlat_jax.eval import plots
  out = evaluate(run.config, run.objective, run.params, num_examples=run.num_samples, batch_size=run.batch_size,
                 progress=lambda it: run.progress(it, "a5"))
  curves = {mode: {L + 1: v for L, v in enumerate(out[f"{mode}/acc_by_length"])} for mode in modes(run.objective)}
  plots.accuracy_by_length(curves, os.path.join(run.out_dir, "a5_accuracy_by_length.png"),
                           title=f"A5 accuracy by length (trained on {out['train_len']})")
  return out
