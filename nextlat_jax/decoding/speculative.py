"""Self-speculative decoding (spec DECODING.md sections 1, 4): a drafter proposes tokens, one trunk pass
verifies them and extends the KV cache, and the rule of Leviathan et al. (2023) accepts or resamples,
so the output has exactly the law of autoregressive sampling (greedy: the same tokens).

State between rounds: the cache holds every emitted token but the last (`pending`), and h_prev is the
trunk's h at the last cached slot. One *verify round* drafts n <= gamma_max tokens after `pending`,
runs the trunk once on [pending, drafts] (giving p_1..p_{n+1}), accepts a prefix of k drafts, emits
them plus a corrected token (first rejection) or a bonus token (all accepted), and rolls the cache back
to [.., pending, accepted drafts] by resetting its length. Modes:
- "A" (paper-faithful, default): a 1-token trunk step on `pending` gives the true h; draft 1 is sampled
  from it (an exact AR sample, q_1 = p_1); then a verify round with pending = draft 1 drafts 2..gamma.
  Two trunk calls per round, a + 2 tokens (a = accepted drafts at positions 2..gamma, the paper's a).
- "B" (latent start): a verify round with gamma drafts started from p_psi(h_prev, E(pending)).
  One trunk call per round, a_B + 1 tokens.

Drafter interface (`Drafter`): three pure functions over the full params tree that propose the tokens
following `pending`, given h_prev = the true h at the token before it (pending is not yet in the cache):
  start(params, h_prev_BxD, x_prev_B, pending_B) -> carry   (x_prev_B: the token at h_prev's position)
  logits(params, carry, j) -> logits_BxV of draft j (0-based)
  feed(params, carry, x_B, j) -> carry once draft j is x_B
`draft` runs any drafter under a draft-length policy and returns (tokens_BxG, q_BxGxV, n_B). NextLat:
start = p_psi(h_prev, E(pending)), logits = h @ W_head, feed = p_psi(., E(x)), all through
`dynamics_step`, whose chain carry (the "attn" kind's window of drafted latents) starts empty at h_prev
and rides in the drafter carry (h_Bx1xD, dynamics carry). JTP (decoding/head_drafters.py) feeds
[x_prev, pending, drafts...] to its Fetch slots and keeps them in its carry; its verifier `head` is
Fetch's slot 0, which reads the block's tokens as well as h.

Static shapes: drafts live in a gamma_max buffer (a while_loop stops early when every row has stopped);
the verify block length is picked by lax.switch among 1..gamma_max+1 (with a KV cache), so short drafts
cost short verify calls. Choices: residual mass <= RESIDUAL_EPS falls back to sampling p (spec section 1);
uniforms are drawn in (0, 1] so a zero-probability draft is never accepted.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

from nextlat_jax.decoding import draft_policies, kv_cache
from nextlat_jax.decoding.generate import (Head, Output, Sampling, append, block_fn, finish, limits, probs, sample,
                                           start, trunk_head)
from nextlat_jax.models.dynamics import dynamics_step, init_carry
from nextlat_jax.models.transformer import ModelConfig

Array = jax.Array
Params = Any
RESIDUAL_EPS = 1e-6
MODES = ("A", "B")


@dataclasses.dataclass(frozen=True, eq=False)
class Drafter:
  name: str
  start: Callable[[Params, Array, Array], Any]
  logits: Callable[[Params, Any, Array], Array]
  feed: Callable[[Params, Any, Array, Array], Any]
  max_drafts: int = 0  # the most drafts it can propose per round; 0: unbounded


@functools.lru_cache(maxsize=32)
def nextlat_drafter(dynamics: Any, cfg: ModelConfig) -> Drafter:
  """Rolls the latent dynamics model p_psi (any kind) from h_prev; logits through the trunk's head. Cached,
  so equal configs give the same (static, jit-hashed) drafter and compiled decoders are reused."""
  def start(params, h_prev_BxD, x_prev_B, pending_B):
    del x_prev_B
    h_Bx1xD = h_prev_BxD[:, None]
    return dynamics_step(dynamics, params, h_Bx1xD, pending_B[:, None], init_carry(dynamics, h_Bx1xD.shape[:-1]))

  return Drafter(
      name="nextlat",
      start=start,
      logits=lambda params, carry, j: kv_cache.logits_at(params["trunk"], cfg, carry[0][:, 0]),
      feed=lambda params, carry, x_B, j: dynamics_step(dynamics, params, carry[0], x_B[:, None], carry[1]))


def draft(drafter: Drafter, params: Params, h_prev_BxD: Array, x_prev_B: Array, pending_B: Array, n_cap_B: Array,
          key: Array, *, sampling: Sampling, policy: dict[str, Array], gamma_max: int):
  """Up to n_cap_B[b] <= gamma_max drafts per row, stopped early by the policy's thresholds.

  Returns (tokens_BxG, q_BxGxV: the sampling distribution each draft came from, n_B: drafts per row).
  """
  B, G = pending_B.shape[0], gamma_max
  V = params["trunk"]["head"].shape[1]
  if G == 0:
    return jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0, V), jnp.float32), jnp.zeros((B,), jnp.int32)
  n_cap_B = jnp.minimum(n_cap_B, drafter.max_drafts or G)

  def body(state):
    j, carry, tokens_BxG, q_BxGxV, n_B, stopped_B, value_B = state
    logits_BxV = drafter.logits(params, carry, j)
    q_BxV = probs(logits_BxV, sampling)
    x_B = sample(jax.random.fold_in(key, j), q_BxV)
    raw_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    value_B = value_B * jnp.take_along_axis(raw_BxV, x_B[:, None], axis=1)[:, 0]
    stop_B = draft_policies.stop_after(policy, jnp.max(raw_BxV, axis=-1), value_B)
    n_B = n_B + (~stopped_B).astype(jnp.int32)
    stopped_B = stopped_B | stop_B | (n_B >= n_cap_B)
    tokens_BxG = jax.lax.dynamic_update_index_in_dim(tokens_BxG, x_B, j, 1)
    q_BxGxV = jax.lax.dynamic_update_index_in_dim(q_BxGxV, q_BxV, j, 1)
    return j + 1, drafter.feed(params, carry, x_B, j), tokens_BxG, q_BxGxV, n_B, stopped_B, value_B

  state = (jnp.zeros((), jnp.int32), drafter.start(params, h_prev_BxD, x_prev_B, pending_B),
           jnp.zeros((B, G), jnp.int32), jnp.zeros((B, G, V), jnp.float32), jnp.zeros((B,), jnp.int32),
           n_cap_B <= 0, jnp.ones((B,), jnp.float32))
  state = jax.lax.while_loop(lambda s: (s[0] < G) & ~jnp.all(s[5]), body, state)
  return state[2], state[3], state[4]


def accept(key: Array, p_BxG1xV: Array, q_BxGxV: Array, drafts_BxG: Array, n_B: Array):
  """Speculative sampling: accept draft s with prob min(1, p_s/q_s) in order; at the first rejection
  sample norm(max(0, p - q)), else a bonus token from p_{n+1}. Returns (k_B accepted, x_B, ok_BxG)."""
  B, G = drafts_BxG.shape
  k_u, k_x = jax.random.split(key)
  px_BxG = jnp.take_along_axis(p_BxG1xV[:, :G], drafts_BxG[..., None], axis=-1)[..., 0]
  qx_BxG = jnp.take_along_axis(q_BxGxV, drafts_BxG[..., None], axis=-1)[..., 0]
  u_BxG = 1.0 - jax.random.uniform(k_u, (B, G))  # (0, 1]
  ok_BxG = (u_BxG * qx_BxG <= px_BxG) & (jnp.arange(G)[None] < n_B[:, None])
  k_B = jnp.sum(jnp.cumprod(ok_BxG.astype(jnp.int32), axis=1), axis=1)
  p_k_BxV = jnp.take_along_axis(p_BxG1xV, k_B[:, None, None], axis=1)[:, 0]
  q_pad_BxG1xV = jnp.pad(q_BxGxV, ((0, 0), (0, 1), (0, 0)))
  q_k_BxV = jnp.take_along_axis(q_pad_BxG1xV, k_B[:, None, None], axis=1)[:, 0]
  rejected_B = k_B < n_B
  w_BxV = jnp.where(rejected_B[:, None], jnp.maximum(p_k_BxV - q_k_BxV, 0.0), p_k_BxV)
  w_BxV = jnp.where(jnp.sum(w_BxV, axis=-1, keepdims=True) > RESIDUAL_EPS, w_BxV, p_k_BxV)
  return k_B, sample(k_x, w_BxV), ok_BxG


def _verify_call(call: Callable, params: Params, cfg: ModelConfig, cache: kv_cache.Cache, block_BxG1: Array,
                 need: Array, sizes: tuple[int, ...], eos_id: int, use_cache: bool):
  """One model call on block[:, :m], m the smallest of `sizes` >= need (lax.switch); h padded to G + 1."""
  G1 = block_BxG1.shape[1]
  if not use_cache:
    return call(params, cfg, cache, block_BxG1, eos_id)

  def branch(m: int):
    def fn(cache):
      h_BxMxD, cache = call(params, cfg, cache, block_BxG1[:, :m], eos_id)
      return jnp.pad(h_BxMxD, ((0, 0), (0, G1 - m), (0, 0))), cache
    return fn
  if len(sizes) == 1:
    return branch(sizes[0])(cache)
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), need), len(sizes) - 1)
  return jax.lax.switch(index, [branch(m) for m in sizes], cache)


@flax.struct.dataclass
class State:
  cache: kv_cache.Cache
  h_prev_BxD: Array
  x_prev_B: Array  # the token at h_prev's position (the last cached one)
  pending_B: Array
  out_BxM: Array
  n_B: Array
  done_B: Array
  gamma_B: Array
  stats: dict[str, Array]


def verify_round(st: State, key: Array, n_cap_B: Array, active_B: Array, *, params, cfg, drafter, sampling,
                  policy, gamma_max, sizes, eos_id, fin, use_cache, head) -> State:
  k_draft, k_acc = jax.random.split(key)
  n_cap_B = jnp.where(active_B, n_cap_B, 0)
  drafts_BxG, q_BxGxV, n_B = draft(drafter, params, st.h_prev_BxD, st.x_prev_B, st.pending_B, n_cap_B, k_draft,
                                   sampling=sampling, policy=policy, gamma_max=gamma_max)
  block_BxG1 = jnp.concatenate([st.pending_B[:, None], drafts_BxG], axis=1)
  h_BxG1xD, cache = _verify_call(block_fn(head, use_cache), params, cfg, st.cache, block_BxG1,
                                 jnp.max(n_B) + 1, sizes, eos_id, use_cache)
  p_BxG1xV = probs(head.logits(params, h_BxG1xD, block_BxG1), sampling)
  k_B, x_B, ok_BxG = accept(k_acc, p_BxG1xV, q_BxGxV, drafts_BxG, n_B)
  j_G1 = jnp.arange(gamma_max + 1)[None]
  new_BxG1 = jnp.where(j_G1 < k_B[:, None], jnp.pad(drafts_BxG, ((0, 0), (0, 1))), x_B[:, None])
  out, n_out_B, finished_B = fin(st.out_BxM, st.n_B, new_BxG1, jnp.where(active_B, k_B + 1, 0))
  cache = kv_cache.rollback(cache, jnp.where(active_B, st.cache.length_B + 1 + k_B, st.cache.length_B))
  h_k_BxD = jnp.take_along_axis(h_BxG1xD, k_B[:, None, None], axis=1)[:, 0]
  x_k_B = jnp.take_along_axis(block_BxG1, k_B[:, None], axis=1)[:, 0]
  tried_BxG = (j_G1[:, :-1] <= k_B[:, None]) & (j_G1[:, :-1] < n_B[:, None]) & active_B[:, None]
  s = dict(st.stats)
  s["rounds"] = s["rounds"] + active_B
  s["drafted"] = s["drafted"] + jnp.where(active_B, n_B, 0)
  s["accepted"] = s["accepted"] + jnp.where(active_B, k_B, 0)
  s["full_rounds"] = s["full_rounds"] + (active_B & (k_B >= n_B))
  s["tried_at"] = s["tried_at"] + tried_BxG
  s["accepted_at"] = s["accepted_at"] + (tried_BxG & ok_BxG)
  s["trunk_calls"] = s["trunk_calls"] + jnp.any(active_B)
  return st.replace(cache=cache, h_prev_BxD=jnp.where(active_B[:, None], h_k_BxD, st.h_prev_BxD),
                    x_prev_B=jnp.where(active_B, x_k_B, st.x_prev_B),
                    pending_B=jnp.where(active_B, x_B, st.pending_B), out_BxM=out, n_B=n_out_B,
                    done_B=st.done_B | (active_B & finished_B),
                    gamma_B=draft_policies.update(policy, st.gamma_B, k_B, n_B, active_B), stats=s)


def ar_step(st: State, key: Array, *, params, cfg, sampling, eos_id, fin, use_cache, head) -> State:
  """Mode A's first step: the trunk on `pending` gives the true h; sample draft 1 from it."""
  active_B = ~st.done_B
  h_Bx1xD, cache = block_fn(head, use_cache)(params, cfg, st.cache, st.pending_B[:, None], eos_id)
  cache = kv_cache.rollback(cache, jnp.where(active_B, cache.length_B, st.cache.length_B))
  x_B = sample(key, probs(head.logits(params, h_Bx1xD[:, 0], st.pending_B), sampling))
  out, n_B, finished_B = fin(st.out_BxM, st.n_B, x_B[:, None], active_B.astype(jnp.int32))
  s = dict(st.stats, trunk_calls=st.stats["trunk_calls"] + 1)
  return st.replace(cache=cache, h_prev_BxD=jnp.where(active_B[:, None], h_Bx1xD[:, 0], st.h_prev_BxD),
                    x_prev_B=jnp.where(active_B, st.pending_B, st.x_prev_B),
                    pending_B=jnp.where(active_B, x_B, st.pending_B), out_BxM=out, n_B=n_B,
                    done_B=st.done_B | (active_B & finished_B), stats=s)


def generate(params: Params, prompt_BxP: Array, prompt_len_B: Array, key: Array, policy: dict[str, Array], *,
             cfg: ModelConfig, drafter: Drafter, sampling: Sampling, max_new: int, gamma_max: int,
             eos_id: int, pad_id: int = 0, stop_at_eos: bool = True, mode: str = "A",
             use_cache: bool = True, verify_sizes: tuple[int, ...] | None = None,
             limit_B: Array | None = None, head: Head | None = None) -> Output:
  """Speculative generation for right-padded prompts; `policy` = DraftPolicy.arrays() (gamma <= gamma_max).

  stats (per row unless noted): rounds, drafted / accepted (drafter tokens, i.e. positions 2.. in mode A),
  full_rounds, tried_at / accepted_at (per draft position, for n-alpha), trunk_calls (batch-wide).
  limit_B: optional per-row token limits (runtime, <= max_new, the static output width).
  verify_sizes: the verify-call lengths compiled (each a lax.switch branch); None: every length
  1..drafter tokens + 1, so a short draft costs a short call; fewer sizes compile faster.
  head: the decoded model's next-token logits (default: the trunk's head; JTP: head_drafters.jtp_head).
  """
  head = head or trunk_head(cfg)
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")
  B, P = prompt_BxP.shape
  G = gamma_max - 1 if mode == "A" else gamma_max  # drafter tokens per round
  if G < 0:
    raise ValueError(f"gamma_max={gamma_max!r}: must be >= 1")
  sizes = tuple(sorted(set(verify_sizes or range(1, G + 2))))
  if sizes[-1] != G + 1 or sizes[0] < 1:
    raise ValueError(f"verify_sizes={verify_sizes!r}: need sizes in [1, {G + 1}] including {G + 1}")
  key, k0 = jax.random.split(key)
  cache, h_BxD, first_B = start(params, cfg, prompt_BxP, prompt_len_B.astype(jnp.int32), k0, sampling=sampling,
                                eos_id=eos_id, size=P + max_new + G + 2, use_cache=use_cache, head=head)
  x_last_B = jnp.take_along_axis(prompt_BxP, jnp.maximum(prompt_len_B.astype(jnp.int32) - 1, 0)[:, None], axis=1)[:, 0]
  limit_B = limits(limit_B, B, max_new)
  fin = functools.partial(append, eos_id=eos_id, stop_at_eos=stop_at_eos, limit_B=limit_B)
  out, n_B, done_B = fin(jnp.full((B, max_new + G + 2), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32),
                         first_B[:, None], jnp.ones((B,), jnp.int32))
  zeros_B = jnp.zeros((B,), jnp.int32)
  stats = dict(rounds=zeros_B, drafted=zeros_B, accepted=zeros_B, full_rounds=zeros_B,
               tried_at=jnp.zeros((B, G), jnp.int32), accepted_at=jnp.zeros((B, G), jnp.int32),
               trunk_calls=jnp.ones((), jnp.int32))
  st = State(cache, h_BxD, x_last_B, first_B, out, n_B, done_B, draft_policies.init_lengths(policy, B), stats)
  kw = dict(params=params, cfg=cfg, sampling=sampling, eos_id=eos_id, fin=fin, use_cache=use_cache, head=head)
  round_kw = dict(kw, drafter=drafter, policy=policy, gamma_max=G, sizes=sizes)

  def body(carry):
    st, r = carry
    k_ar, k_round = jax.random.split(jax.random.fold_in(key, r))
    if mode == "A":
      st = ar_step(st, k_ar, **kw)
      n_cap_B = st.gamma_B - 1
    else:
      n_cap_B = st.gamma_B
    active_B = ~st.done_B
    n_cap_B = jnp.clip(jnp.minimum(n_cap_B, limit_B - st.n_B - 1), 0, G)
    st = jax.lax.cond(jnp.any(active_B),
                      lambda s: verify_round(s, k_round, n_cap_B, active_B, **round_kw), lambda s: s, st)
    return st, r + 1

  st, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[0].done_B), body, (st, jnp.zeros((), jnp.int32)))
  return Output(finish(st.out_BxM, st.n_B, max_new, pad_id), st.n_B, st.stats, st.cache)


generate_jit = jax.jit(generate, static_argnames=("cfg", "drafter", "max_new", "gamma_max", "pad_id",
                                                  "mode", "use_cache", "verify_sizes", "head"))
