"""Linear probes of a frozen model's hidden states for offsets k = 1..K (METRICS.md §10).

Probe k maps stop_gradient(h_t) (D) to logits over the vocabulary (V) and is trained with CE on
x_{t+k}. All K probes train in one jitted step; clipping is per probe, so they stay independent
(AdamW is element-wise). Score: Δ_k = CE_val(model, probe_k) - CE_val(reference GPT, probe_k).

Choices where the spec is silent (arguments / flags):
- bias: on (`bias=True`), not weight-decayed; weight decay 0.1 on W only.
- targets in a later document: x_{t+k} is kept iff no EOS lies among x_{t+1} .. x_{t+k-1} (the EOS that
  closes h_t's document is itself a target, as in next-token training); targets past the row end or on
  padding are skipped.
- learning-rate schedule: constant 3e-4 (the pretraining peak); probe weights start at 0.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  offsets: int = 20
  steps: int = 20_000
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip: float = 1.0
  bias: bool = True


def targets(tokens_BxL: np.ndarray, segment_BxL: np.ndarray, eos_id: int, offsets: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Targets x_{t+k} (K, B, L-1) for positions t = 0..L-2 and their masks (see the module docstring)."""
  B, L = tokens_BxL.shape
  eos_before_BxL = np.cumsum(tokens_BxL == eos_id, axis=1)  # EOS among x_0..x_t
  tgt = np.zeros((offsets, B, L - 1), np.int32)
  mask = np.zeros((offsets, B, L - 1), bool)
  t = np.arange(L - 1)
  for k in range(1, offsets + 1):
    j = t + k
    ok_T = j < L
    jj = np.minimum(j, L - 1)
    between_BxT = eos_before_BxL[:, np.minimum(j - 1, L - 1)] - eos_before_BxL[:, t]  # EOS in x_{t+1..t+k-1}
    tgt[k - 1] = tokens_BxL[:, jj]
    mask[k - 1] = (ok_T[None] & (segment_BxL[:, t] >= 0) & (segment_BxL[:, jj] >= 0) & (between_BxT == 0))
  return tgt, mask


def init(rng: Array, offsets: int, d: int, v: int) -> dict:
  del rng  # zero init: a probe starts at the uniform distribution
  return {"w": jnp.zeros((offsets, d, v), jnp.float32), "b": jnp.zeros((offsets, v), jnp.float32)}


def _ce_k(w_DxV: Array, b_V: Array, h_BxTxD: Array, tgt_BxT: Array, mask_BxT: Array) -> tuple[Array, Array]:
  """(summed CE, number of targets) of one probe."""
  logits_BxTxV = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV) + b_V
  logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, tgt_BxT[..., None], axis=-1)[..., 0]
  m = mask_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * m), jnp.sum(m)


def ce_sums(probes: dict, h_BxTxD: Array, tgt_KxBxT: Array, mask_KxBxT: Array) -> tuple[Array, Array]:
  """Per-probe summed CE and target counts (K,), one probe at a time (memory O(B T V))."""
  h = jax.lax.stop_gradient(h_BxTxD.astype(jnp.float32))
  fn = jax.checkpoint(lambda args: _ce_k(args[0], args[1], h, args[2], args[3]))
  return jax.lax.map(fn, (probes["w"], probes["b"], tgt_KxBxT, mask_KxBxT))


def clip_per_probe(max_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping computed separately for each probe (the leading axis of every leaf)."""

  def update(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    sq_K = sum(jnp.sum(jnp.reshape(u, (u.shape[0], -1)) ** 2, axis=1) for u in leaves)
    norm_K = jnp.sqrt(sq_K)
    scale_K = jnp.where(norm_K > max_norm, max_norm / jnp.maximum(norm_K, 1e-30), 1.0)
    return jax.tree.map(lambda u: u * scale_K.reshape((-1,) + (1,) * (u.ndim - 1)), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(cfg: ProbeConfig) -> optax.GradientTransformation:
  return optax.chain(clip_per_probe(cfg.clip),
                     optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                 mask={"w": True, "b": False}))


def make_step(cfg: ProbeConfig) -> Callable:
  """Jitted (probes, opt_state, h, targets, masks) -> (probes, opt_state, per-probe train CE)."""
  tx = optimizer(cfg)

  def loss(probes, h, tgt, mask):
    sums, counts = ce_sums(probes, h, tgt, mask)
    ce_K = sums / jnp.maximum(counts, 1.0)
    return jnp.sum(ce_K), ce_K

  @jax.jit
  def step(probes, opt_state, h, tgt, mask):
    if not cfg.bias:
      probes = {**probes, "b": jnp.zeros_like(probes["b"])}
    grads, ce_K = jax.grad(loss, has_aux=True)(probes, h, tgt, mask)
    if not cfg.bias:
      grads = {**grads, "b": jnp.zeros_like(grads["b"])}
    updates, opt_state = tx.update(grads, opt_state, probes)
    return optax.apply_updates(probes, updates), opt_state, ce_K

  return step, tx


def train(hidden: Callable[[dict], np.ndarray], batches: Iterable[dict], eos_id: int, vocab: int,
          cfg: ProbeConfig = ProbeConfig(), progress: Callable = lambda it, desc=None: it) -> tuple[dict, list]:
  """Trains the K probes on frozen hidden states for cfg.steps batches; returns (probes, train CE log)."""
  step_fn, tx = make_step(cfg)
  probes, opt_state, log = None, None, []
  it = iter(batches)
  for i in progress(range(cfg.steps), "probes"):
    batch = next(it, None)
    if batch is None:
      raise ValueError(f"probe training data ran out after {i} of {cfg.steps} batches")
    tokens = np.asarray(batch["tokens"])
    h = hidden(batch)[:, :tokens.shape[1] - 1]
    tgt, mask = targets(tokens, np.asarray(batch["segment_ids"]), eos_id, cfg.offsets)
    if probes is None:
      probes = init(jax.random.PRNGKey(0), cfg.offsets, h.shape[-1], vocab)
      opt_state = tx.init(probes)
    probes, opt_state, ce_K = step_fn(probes, opt_state, h, tgt, mask)
    if i % 100 == 0 or i == cfg.steps - 1:
      log.append((i, np.asarray(ce_K).tolist()))
  if probes is None:
    raise ValueError("probe training needs steps >= 1")
  return probes, log


_ce_sums_jit = jax.jit(ce_sums)


def validation_ce(hidden: Callable[[dict], np.ndarray], probes: dict, batches: Iterable[dict], eos_id: int
                  ) -> np.ndarray:
  """Token-weighted CE (K,) of each probe over the batches."""
  K = probes["w"].shape[0]
  sums, counts = np.zeros(K), np.zeros(K)
  for batch in batches:
    tokens = np.asarray(batch["tokens"])
    h = hidden(batch)[:, :tokens.shape[1] - 1]
    tgt, mask = targets(tokens, np.asarray(batch["segment_ids"]), eos_id, K)
    s, c = _ce_sums_jit(probes, h, tgt, mask)
    sums += np.asarray(s, np.float64)
    counts += np.asarray(c, np.float64)
  return sums / np.maximum(counts, 1.0)


def _probe_ce_of(model_run, data_run, cfg: ProbeConfig, val_batches: int) -> np.ndarray:
  """Probe CE by offset of model_run's hidden states, on data_run's rows (train, then eval split)."""
  eos, vocab = int(data_run.config.data.eos_id), int(data_run.config.model.vocab_size)
  rows = data_run.batch_size
  probes, _ = train(model_run.hidden, data_run.batches("train", cfg.steps, rows), eos, vocab, cfg,
                    data_run.progress)
  return validation_ce(model_run.hidden, probes, data_run.batches("eval", val_batches, rows), eos)


def evaluate(run) -> dict:
  """TASK_METRICS entry: probe CE by offset of this run, and the difference to --probe_reference."""
  from nextlat_jax.eval import plots
  from nextlat_jax.eval.run import restore
  opts = run.options
  cfg = ProbeConfig(steps=int(opts.get("probe_steps") or ProbeConfig.steps))
  val_batches = int(opts.get("probe_val_batches", 8))
  ce = _probe_ce_of(run, run, cfg, val_batches)
  out: dict[str, Any] = {"probe_steps": cfg.steps, "probe_rows": run.batch_size,
                         "probe_ce": {k + 1: float(v) for k, v in enumerate(ce)}}
  curves = {run.config.objective.name: out["probe_ce"]}
  if opts.get("probe_reference"):
    ref = restore(opts["probe_reference"], None, batch_size=run.batch_size, show_progress=run.show_progress)
    if int(ref.config.model.vocab_size) != int(run.config.model.vocab_size):
      raise ValueError(f"--probe_reference={opts['probe_reference']!r}: vocabulary "
                       f"{ref.config.model.vocab_size} differs from this run's {run.config.model.vocab_size}")
    ref_ce = _probe_ce_of(ref, run, cfg, val_batches)  # the same rows for both models
    out["reference_probe_ce"] = {k + 1: float(v) for k, v in enumerate(ref_ce)}
    out["probe_ce_difference"] = {k + 1: float(a - b) for k, (a, b) in enumerate(zip(ce, ref_ce))}
    curves["reference"] = out["reference_probe_ce"]
    plots.probe_ce(out["probe_ce_difference"], os.path.join(run.out_dir, "probe_ce_difference.png"),
                   title="probe CE difference to the reference", ylabel="Δ CE (nats)")
  plots.probe_ce(curves, os.path.join(run.out_dir, "probe_ce.png"))
  return out
