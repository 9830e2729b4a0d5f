"""Decoding JTP models: the next-token head through Fetch and self-speculative drafting from Fetch's
slots (issue 7; spec BASELINES.md section 4, DECODING.md section 1).

A JTP model predicts x_{t+1} from slot 0 of its Fetch module, TC(h_t, E[x_t]), so its next-token
distribution reads the input token as well as h_t (`jtp_head`; a one-slot Fetch call, no trunk call).
Drafting from h_prev = h_t at the last cached token x_t, with `pending` = x_{t+1} chosen: slot 1 is fed
pending and proposes x_{t+2}, slot k is fed the (k-1)-th draft and proposes the next one, so one round
drafts at most d = objective.horizon tokens, all teacher-forced on the drafts as in training. Each
draft re-runs the (d+1)-slot Fetch attention on the slot buffer; slots are causal, so entries past the
current one do not change it. The verifier is the same trunk pass as for NextLat, with `jtp_head`.

MTP (parallel heads): the deployed model is n_layer - 1 trunk blocks + head 0; every extra head is a
block over the whole prefix, so the MTP model's cached call (`mtp_head(...).extend`) keeps K/V for the
trunk blocks and for every head, and returns all heads' states at each new position. Draft j is head
j + 1 at the last verified position (`mtp_drafter`), so drafting costs no model call.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from nextlat_jax.decoding import kv_cache
from nextlat_jax.decoding.generate import Head
from nextlat_jax.decoding.speculative import Drafter
from nextlat_jax.models.transformer import DTYPES, Block, ModelConfig, RMSNorm, Stack, embed, unembed
from nextlat_jax.objectives.jtp import Fetch

Array = jax.Array
Params = Any


def _fetch_logits(fetch: Fetch, cfg: ModelConfig, params: Params, h_NxD: Array, toks_NxS: Array) -> Array:
  """Logits (N, S, V) of every Fetch slot for states h_NxD and slot input tokens toks_NxS."""
  e_Nx1xSxD = embed(cfg, params["trunk"], toks_NxS)[:, None]
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


@functools.lru_cache(maxsize=32)
def mtp_head(cfg: ModelConfig, n_heads: int) -> Head:
  """An MTP model (Gloeckle et al., as built for the paper): n_layer - 1 trunk blocks, then n_heads = d + 1
  parallel one-block heads with their own norms, sharing the output head. Its cached call runs the trunk
  blocks and every head block on the new tokens (cache layers: trunk, then head 0..d) and returns h as the
  heads' states side by side, (B, T, n_heads * D); the next-token logits read head 0."""
  D, L = cfg.d_model, cfg.n_layer - 1
  stack = Stack(dataclasses.replace(cfg, n_layer=L), final_norm=False)
  block, norm = Block(cfg), RMSNorm(cfg.norm_eps, DTYPES[cfg.param_dtype], out_dtype=jnp.float32)

  def extend(params: Params, cfg_: ModelConfig, cache: kv_cache.Cache, tokens_BxT: Array, eos_id: Any,
             n_valid_B: Array | None = None) -> tuple[Array, kv_cache.Cache]:
    cache, positions_BxT, kv = kv_cache.append_block(cache, tokens_BxT, eos_id)
    e_BxTxD = embed(cfg, params["trunk"], tokens_BxT)
    z_BxTxD, trunk_kv = stack.apply({"params": params["trunk"]["stack"]}, e_BxTxD, None, positions_BxT,
                                    kv.layers(0, L))
    hs, rows = [], []
    for i in range(n_heads):  # MTPHead: its block, then its own norm
      hp = params["heads"][f"head_{i}"]
      x_BxTxD, kv_rows = block.apply({"params": hp["block"]}, z_BxTxD, kv.mask_Bx1xTxS, positions_BxT,
                                     (kv.k_LxBxSxNxH[L + i], kv.v_LxBxSxNxH[L + i]), kv.start_B)
      hs.append(norm.apply({"params": hp["norm"]}, x_BxTxD))
      rows.append(kv_rows)
    heads_kv = kv.layers(L, L + n_heads).written(*(jnp.stack(r) for r in zip(*rows)))
    kv = kv.replace(k_LxBxSxNxH=jnp.concatenate([trunk_kv.k_LxBxSxNxH, heads_kv.k_LxBxSxNxH]),
                    v_LxBxSxNxH=jnp.concatenate([trunk_kv.v_LxBxSxNxH, heads_kv.v_LxBxSxNxH]))
    return jnp.concatenate(hs, axis=-1), kv_cache.commit(cache, kv, n_valid_B, tokens_BxT.shape[1])

  def logits(params: Params, h_xH: Array, x_x: Array) -> Array:
    return kv_cache.logits_at(params["trunk"], cfg, h_xH[..., :D])

  return Head("mtp", logits, extend, cache_layers=L + n_heads)


@functools.lru_cache(maxsize=32)
def mtp_drafter(cfg: ModelConfig, n_heads: int) -> Drafter:
  """Draft j = head j + 1 at h_prev's position (head i there predicts the token i + 1 ahead, and the
  pending token is head 0's): up to d = n_heads - 1 drafts per round, none depending on the others."""
  D = cfg.d_model

  def logits(params: Params, h_BxH: Array, j: Array) -> Array:
    return kv_cache.logits_at(params["trunk"], cfg, jax.lax.dynamic_slice_in_dim(h_BxH, (j + 1) * D, D, axis=-1))

  return Drafter(name="mtp", start=lambda params, h_prev_BxH, x_prev_B, pending_B: h_prev_BxH, logits=logits,
                 feed=lambda params, h_BxH, x_B, j: h_BxH, max_drafts=n_heads - 1)
