"""The train state, the pure train step, and their sharded, jitted forms over a mesh."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from nextlat_jax import objectives
from nextlat_jax.parallel import sharding
from nextlat_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
EXTRA_KEYS = ("labels",)  # optional task fields: `labels` = CE targets by column (A5), default tokens


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array  # number of steps whose update was skipped for a NaN/inf loss or gradient


def loss_and_grads(params: Any, batch: dict, rng: jax.Array, objective: objectives.Objective,
                   microbatches: int = 1, batch_sharding: NamedSharding | None = None):
  """((loss, metrics), grads) of the whole batch, accumulated over `microbatches` sequential slices.

  Microbatch i takes rows i, i+k, i+2k, ... so every device keeps an equal share of each one.
  Token-weighted: every microbatch's loss divides by the whole batch's denominators
  (`objective.counts`: loss tokens per term, pairs, rows; the sums of the microbatches' counts), so
  the sums of the microbatch losses, metrics and gradients are the whole batch's, up to float32
  summation order, however the masks (prompt, padding, EOS transitions) spread over microbatches.
  Microbatch i draws from fold_in(rng, i).
  """
  grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch, rng)
  if objective.counts is None:
    raise ValueError(f"objective {objective.name!r} has no counts(); microbatches={microbatches} needs one")

  def split(x):
    B = x.shape[0]
    x = x.reshape(B // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    if batch_sharding is not None:
      spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, spec))
    return x

  micro = jax.tree.map(split, batch)
  # Each count is a sum over rows: the whole batch's is the sum of the microbatches' (one at a time).
  counts = jax.tree.map(lambda c: jnp.sum(c, axis=0), jax.lax.map(objective.counts, micro))

  def body(acc, mb_and_i):
    mb, i = mb_and_i
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), counts)
    return jax.tree.map(jnp.add, acc, ((loss, metrics), grads)), None

  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng, counts)
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zero, (micro, jnp.arange(microbatches)))
  return total


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, objective: objectives.Objective,
               tx: optax.GradientTransformation, lr: optax.Schedule, microbatches: int = 1,
               batch_sharding: NamedSharding | None = None) -> tuple[TrainState, dict]:
  """One optimizer update: (state, batch, rng) -> (state, metrics).

  A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged (the
  trainer then skips on or stops, per `config.nan_guard`), so a NaN never reaches the state.
  """
  rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = loss_and_grads(state.params, batch, rng, objective, microbatches, batch_sharding)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  nonfinite = state.nonfinite + (~finite).astype(jnp.int32)
  metrics = dict(metrics, grad_norm=grad_norm, lr=lr(state.step), finite=finite, nonfinite_steps=nonfinite)
  return TrainState(step=state.step + 1, params=keep(params, state.params),
                    opt_state=keep(opt_state, state.opt_state), nonfinite=nonfinite), metrics


def eval_step(params: Any, batch: dict, rng: jax.Array, *, objective: objectives.Objective) -> dict:
  _, metrics = objective.loss(params, batch, rng)
  return metrics


@dataclasses.dataclass
class Setup:
  """Everything the trainer (and benchmarks, tests) need to run sharded steps."""
  mesh: Mesh
  objective: objectives.Objective
  tx: optax.GradientTransformation
  lr: optax.Schedule
  state_shardings: TrainState
  batch_sharding: NamedSharding
  abstract_state: TrainState
  init: Any  # jitted rng -> TrainState
  step: Any  # jitted (state, batch, rng) -> (state, metrics), state donated
  eval: Any  # jitted (params, batch, rng) -> metrics

  def abstract_batch(self, global_batch: int, row_len: int, extra_fields: tuple[str, ...] = ()) -> dict:
    return {k: jax.ShapeDtypeStruct((global_batch, row_len), jnp.int32, sharding=self.batch_sharding)
            for k in BATCH_KEYS + tuple(extra_fields)}

  def abstract_rng(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(self.mesh))


def build(config: Any, mesh: Mesh) -> Setup:
  """Builds the objective, optimizer and shardings, and jits init / step / eval for `mesh`."""
  rules = sharding.logical_rules(config)
  objective = objectives.build(config, mesh)
  boxed = jax.eval_shape(objective.init, jax.random.PRNGKey(0))
  param_sh = sharding.param_shardings(boxed, mesh, rules)
  tx, lr = make_optimizer(config.optimizer, int(config.steps), sharding.decay_mask(boxed), boxed)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  rep = sharding.replicated(mesh)
  # Moments shard like their params; optax.partition (Muon) leaves MaskedNode where a group has no state.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: rep, is_leaf=masked)
  state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh, nonfinite=rep)
  batch_sh = sharding.batch_sharding(mesh, rules)

  def init(rng: jax.Array) -> TrainState:
    params = nn.unbox(objective.init(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite=jnp.zeros((), jnp.int32))

  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(init, jax.random.PRNGKey(0)), state_sh)
  step = jax.jit(functools.partial(train_step, objective=objective, tx=tx, lr=lr,
                                   microbatches=int(config.microbatches), batch_sharding=batch_sh),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
                 # The state is updated in place. The batch is not donated: XLA can only reuse a donated
                 # buffer for an output of its shape and no output has a batch field's, so it would free
                 # nothing (jax drops the donation and warns; tests/test_sharding.py).
                 donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, objective=objective),
                     in_shardings=(param_sh, batch_sh, rep), out_shardings=rep)
  return Setup(mesh=mesh, objective=objective, tx=tx, lr=lr, state_shardings=state_sh,
               batch_sharding=batch_sh, abstract_state=abstract_state,
               init=jax.jit(init, out_shardings=state_sh), step=step, eval=evaluate)


def global_batch(local: dict, batch_sh: NamedSharding) -> dict:
  """This process's rows -> global jax.Arrays sharded over the batch axes."""
  keys = BATCH_KEYS + tuple(k for k in EXTRA_KEYS if k in local)
  return {k: jax.make_array_from_process_local_data(batch_sh, local[k]) for k in keys}
