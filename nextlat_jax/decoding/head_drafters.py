"""Decoding JTP models: the next-token head through Fetch and self-speculative drafting from Fetch's
slots (issue 7; spec BASELINES.md section 4, DECODING.md section 1).

A JTP model predicts x_{t+1} from slot 0 of its Fetch module, TC(h_t, E[x_t]), so its next-token
distribution reads the input token as well as h_t (`jtp_head`; a one-slot Fetch call, no trunk call).
Drafting from h_prev = h_t at the last cached token x_t, with `pending` = x_{t+1} chosen: slot 1 is fed
pending and proposes x_{t+2}, slot k is fed the (k-1)-th draft and proposes the next one, so one round
drafts at most d = objective.horizon tokens, all teacher-forced on the drafts as in training. Each
draft re-runs the (d+1)-slot Fetch attention on the slot buffer; slots are causal, so entries past the
current one do not change it. The verifier is the same trunk pass as for NextLat, with `jtp_head`.

MTP (parallel heads) has no drafter here: each extra head is a transformer block over the whole prefix
and would need a KV cache of its own in the verifier's loop (see docs/decoding.md).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nextlat_jax.decoding.generate import Head
from nextlat_jax.decoding.speculative import Drafter
from nextlat_jax.models.transformer import DTYPES, ModelConfig, unembed
from nextlat_jax.objectives.jtp import Fetch

Array = jax.Array
Params = Any


def _fetch_logits(fetch: Fetch, cfg: ModelConfig, params: Params, h_NxD: Array, toks_NxS: Array) -> Array:
  """Logits (N, S, V) of every Fetch slot for states h_NxD and slot input tokens toks_NxS."""
  e_Nx1xSxD = jnp.take(params["trunk"]["embed"], toks_NxS, axis=0)[:, None]
  o_Nx1xSxD = fetch.apply({"params": params["fetch"]}, h_NxD[:, None], e_Nx1xSxD)
  return unembed(o_Nx1xSxD[:, 0], params["trunk"]["head"], DTYPES[cfg.dtype])


@functools.lru_cache(maxsize=32)
def jtp_head(fetch: Fetch, cfg: ModelConfig) -> Head:
  """JTP's next-token logits: slot 0 of Fetch on (h_t, E[x_t])."""
  def logits(params: Params, h_xD: Array, x_x: Array) -> Array:
    lead = x_x.shape
    out_Nx1xV = _fetch_logits(fetch, cfg, params, h_xD.reshape(-1, h_xD.shape[-1]), x_x.reshape(-1, 1))
    return out_Nx1xV[:, 0].reshape(*lead, out_Nx1xV.shape[-1])
  return Head("jtp", logits)


@functools.lru_cache(maxsize=32)
def jtp_drafter(fetch: Fetch, cfg: ModelConfig) -> Drafter:
  """Drafts up to d = fetch.slots - 1 tokens per round from Fetch slots 1..d."""
  d = fetch.slots - 1

  def start(params: Params, h_prev_BxD: Array, x_prev_B: Array, pending_B: Array):
    toks_BxS1 = jnp.zeros((x_prev_B.shape[0], d + 2), jnp.int32)  # one spare slot: feed after the last draft
    toks_BxS1 = toks_BxS1.at[:, 0].set(x_prev_B).at[:, 1].set(pending_B)
    return h_prev_BxD, toks_BxS1

  def logits(params: Params, carry, j: Array) -> Array:
    h_BxD, toks_BxS1 = carry
    logits_BxSxV = _fetch_logits(fetch, cfg, params, h_BxD, toks_BxS1[:, :d + 1])
    return jax.lax.dynamic_index_in_dim(logits_BxSxV, j + 1, axis=1, keepdims=False)

  def feed(params: Params, carry, x_B: Array, j: Array):
    h_BxD, toks_BxS1 = carry
    return h_BxD, jax.lax.dynamic_update_index_in_dim(toks_BxS1, x_B.astype(jnp.int32), j + 2, 1)

  return Drafter(name="jtp", start=start, logits=logits, feed=feed, max_drafts=d)
