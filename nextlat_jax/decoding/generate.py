"""Autoregressive generation with a KV cache (or the paper's no-cache baseline): greedy, temperature,
top-k and top-p sampling, batched prompts of different lengths, stop at EOS.

Layout: prompts arrive right-padded (`prompt_BxP`, real lengths `prompt_len_B`); in the cache each row
is left-aligned with its own length (nextlat_jax.decoding.kv_cache). A prompt is read as a packed row of
the batch contract: its first token has position 1, and an EOS inside it starts a new document
(segment ids and positions restart), so a prompt may end with EOS to generate a fresh document.

The whole generation is one jitted `lax.while_loop` with static shapes: prompt length P (callers bucket
it, see `bucket_length`), max_new_tokens (the output buffer) and top_k are static; the temperature,
top_p, eos_id, stop_at_eos and optional per-row limits `limit_B` <= max_new_tokens are runtime values
(so greedy and sampled decoding share one compiled program). The loop ends when every
row has emitted EOS (with stop_at_eos) or its limit of tokens; outputs past a row's length are pad_id.

The model's next-token distribution comes from a `Head` (static): the trunk's output head for GPT and
NextLat (`trunk_head`); JTP predicts the next token through its Fetch module's slot 0, which also reads
the input token at the position (`nextlat_jax.decoding.head_drafters.jtp_head`).

Standardised sampling (spec DECODING.md section 0): temperature (clamped to >= 1e-6), then top-k, then
top-p. temperature == 0 means greedy: the distribution is one-hot at the argmax (the first on ties).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nextlat_jax.decoding import kv_cache
from nextlat_jax.models.transformer import ModelConfig

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
  """The decoded model's output path. logits(params, h_xH, x_x) -> logits_xV (float32): next-token logits
  at positions with state h and input token x, any leading shape. extend: for models whose cached stack
  is not the trunk alone (MTP), (params, cfg, cache, tokens_BxT, eos_id, n_valid_B=None) -> (h_BxTxH,
  cache) over `cache_layers` K/V layers; None: `kv_cache.extend` on params["trunk"]."""
  name: str
  logits: Callable[[Params, Array, Array], Array]
  extend: Callable[..., tuple[Array, kv_cache.Cache]] | None = None
  cache_layers: int = 0


@functools.lru_cache(maxsize=32)
def trunk_head(cfg: ModelConfig) -> Head:
  """h_t @ W_head (GPT, NextLat). Cached, so equal configs give one (jit-hashed) head."""
  return Head("trunk", lambda params, h_xD, x_x: kv_cache.logits_at(params["trunk"], cfg, h_xD))


@jax.tree_util.register_pytree_node_class
class Sampling:
  """Sampling settings. A pytree: temperature and top_p are runtime values under jit (greedy and
  sampled decoding share one compiled program); top_k and whether top-p is on at all are static."""

  def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    if not float(temperature) >= 0.0:
      raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 = greedy)")
    if int(top_k) < 0:
      raise ValueError(f"top_k={top_k!r}: must be >= 0 (0 = off)")
    if not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (1 = off)")
    self.temperature, self.top_p = jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32)
    self.top_k, self.nucleus = int(top_k), float(top_p) < 1.0

  def tree_flatten(self):  # the leaves as they are: jit's AOT path (lower) flattens trees of ArgInfo too
    return (self.temperature, self.top_p), (self.top_k, self.nucleus)

  @classmethod
  def tree_unflatten(cls, aux, children):
    out = object.__new__(cls)
    out.temperature, out.top_p = children
    out.top_k, out.nucleus = aux
    return out

  @property
  def greedy(self) -> bool:
    """Whether decoding is greedy (concrete settings only)."""
    return float(self.temperature) == 0.0

  def __repr__(self) -> str:
    return f"Sampling(temperature={float(self.temperature):g}, top_k={self.top_k}, top_p={float(self.top_p):g})"


def probs(logits_xV: Array, sampling: Sampling) -> Array:
  """The sampling distribution (float32) over the last axis: temperature, then top-k, then top-p;
  one-hot at the argmax (the first on ties) when the temperature is 0."""
  logits = logits_xV.astype(jnp.float32)
  V = logits.shape[-1]
  t = jnp.asarray(sampling.temperature, jnp.float32)
  one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
  logits = logits / jnp.maximum(t, 1e-6)
  if 0 < sampling.top_k < V:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  if sampling.nucleus:
    sorted_p = jnp.sort(p, axis=-1)[..., ::-1]
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    # Keep the smallest top set whose mass reaches top_p: tokens whose predecessors hold < top_p.
    n_keep = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_p, n_keep - 1, axis=-1)
    p = jnp.where(p >= cutoff, p, 0.0)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
  return jnp.where(t == 0.0, one_hot, p)


def sample(key: Array, probs_xV: Array) -> Array:
  """One token per distribution (int32); exact for one-hot (greedy) rows."""
  logp = jnp.where(probs_xV > 0, jnp.log(jnp.maximum(probs_xV, 1e-38)), -jnp.inf)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class Output:
  tokens_BxM: Array  # generated tokens (M = max_new_tokens), pad_id past each row's length
  lengths_B: Array  # tokens generated per row (an emitted EOS included)
  stats: dict[str, Array]  # per-row int32 counters (rounds, accepted drafts, ...) and trunk calls
  cache: kv_cache.Cache  # the final cache: prompt and every emitted token but the last


def bucket_length(n: int, minimum: int = 8) -> int:
  """Static prompt width for n tokens: the next power of two (>= minimum), to bound recompiles."""
  size = minimum
  while size < n:
    size *= 2
  return size


def pad_prompts(prompts: list, pad_id: int = 0, minimum: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Token-id lists -> right-padded (B, P) int32 prompts (P bucketed) and their (B,) lengths."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"prompts={prompts!r}: need at least one prompt, each of at least one token")
  P = bucket_length(max(len(p) for p in prompts), minimum)
  out = np.full((len(prompts), P), pad_id, np.int32)
  for b, p in enumerate(prompts):
    out[b, :len(p)] = np.asarray(p, np.int32)
  return out, np.asarray([len(p) for p in prompts], np.int32)


def append(out_BxM: Array, n_B: Array, new_BxK: Array, count_B: Array, *, eos_id: int | Array,
           stop_at_eos: bool | Array, limit_B: Array) -> tuple[Array, Array, Array]:
  """Appends new[:, :count] at each row's length, cut after an EOS and at the row's limit.

  Returns (out, n, finished): finished is True where the row emitted EOS or reached its limit.
  out needs max(limit) + K columns (a row's write starts at n <= limit).
  """
  K = new_BxK.shape[1]
  j_K = jnp.arange(K, dtype=jnp.int32)
  count_B = jnp.minimum(count_B, limit_B - n_B)
  hit_eos_BxK = (new_BxK == eos_id) & (j_K[None] < count_B[:, None]) & stop_at_eos
  first_eos_B = jnp.min(jnp.where(hit_eos_BxK, j_K[None], K), axis=1)
  count_B = jnp.minimum(count_B, first_eos_B + 1)
  out_BxM = kv_cache.write_rows(out_BxM, new_BxK, n_B)
  n_B = n_B + count_B
  return out_BxM, n_B, (first_eos_B < K) | (n_B >= limit_B)


def limits(limit_B: Array | None, batch: int, max_new: int) -> Array:
  """Per-row token limits, clipped to [1, max_new] (None: max_new for every row)."""
  if limit_B is None:
    return jnp.full((batch,), max_new, jnp.int32)
  return jnp.clip(jnp.asarray(limit_B, jnp.int32), 1, max_new)


def finish(out_BxM: Array, n_B: Array, max_new: int, pad_id: int) -> Array:
  M = out_BxM.shape[1]
  return jnp.where(jnp.arange(M)[None] < n_B[:, None], out_BxM, pad_id)[:, :max_new]


def extend_fn(use_cache: bool):
  """The trunk's block call: cached, or the no-cache baseline (full forward over stored tokens)."""
  return kv_cache.extend if use_cache else kv_cache.extend_nocache


def block_fn(head: Head, use_cache: bool):
  """(params, cfg, cache, tokens_BxT, eos_id) -> (h_BxTxH, cache): one call of the decoded model."""
  if head.extend is not None:
    if not use_cache:
      raise ValueError(f"{head.name}: decoding needs the KV cache (no no-cache baseline)")
    return head.extend
  ext = extend_fn(use_cache)
  return lambda params, cfg, cache, tokens_BxT, eos_id: ext(params["trunk"], cfg, cache, tokens_BxT, eos_id)


def start(params: Params, cfg: ModelConfig, prompt_BxP: Array, prompt_len_B: Array, key: Array, *,
          sampling: Sampling, eos_id: int, size: int, use_cache: bool, head: Head | None = None):
  """Prefill, then sample the first new token: (cache, h_last_BxD, first_B)."""
  head = head or trunk_head(cfg)
  if head.extend is None:
    h_BxPxD, cache = kv_cache.prefill(params["trunk"], cfg, prompt_BxP, prompt_len_B, eos_id, size, use_cache)
  else:
    block_fn(head, use_cache)  # refuses use_cache=False
    cache = kv_cache.init_cache(dataclasses.replace(cfg, n_layer=head.cache_layers), prompt_BxP.shape[0], size)
    h_BxPxD, cache = head.extend(params, cfg, cache, prompt_BxP, eos_id, prompt_len_B)
  idx_B = jnp.maximum(prompt_len_B - 1, 0)
  h_BxD = jnp.take_along_axis(h_BxPxD, idx_B[:, None, None], axis=1)[:, 0]
  x_B = jnp.take_along_axis(prompt_BxP, idx_B[:, None], axis=1)[:, 0]
  first_B = sample(key, probs(head.logits(params, h_BxD, x_B), sampling))
  return cache, h_BxD, first_B


def generate(params: Params, prompt_BxP: Array, prompt_len_B: Array, key: Array, *, cfg: ModelConfig,
             sampling: Sampling, max_new: int, eos_id: int, pad_id: int = 0, stop_at_eos: bool = True,
             use_cache: bool = True, limit_B: Array | None = None, head: Head | None = None) -> Output:
  """Autoregressive generation for right-padded prompts; params = {'trunk': ..., ...}."""
  B, P = prompt_BxP.shape
  head = head or trunk_head(cfg)
  ext = block_fn(head, use_cache)
  prompt_len_B = prompt_len_B.astype(jnp.int32)
  key, k0 = jax.random.split(key)
  cache, _, x_B = start(params, cfg, prompt_BxP, prompt_len_B, k0, sampling=sampling, eos_id=eos_id,
                        size=P + max_new + 1, use_cache=use_cache, head=head)
  out = jnp.full((B, max_new + 1), pad_id, jnp.int32)
  n_B = jnp.zeros((B,), jnp.int32)
  fin = functools.partial(append, eos_id=eos_id, stop_at_eos=stop_at_eos, limit_B=limits(limit_B, B, max_new))
  out, n_B, done_B = fin(out, n_B, x_B[:, None], jnp.ones((B,), jnp.int32))

  def body(state):
    cache, x_B, out, n_B, done_B, step = state
    h_BxTxD, new = ext(params, cfg, cache, x_B[:, None], eos_id)
    cache = kv_cache.rollback(new, jnp.where(done_B, cache.length_B, new.length_B))
    logits_BxV = head.logits(params, h_BxTxD[:, 0], x_B)
    x_B = sample(jax.random.fold_in(key, step), probs(logits_BxV, sampling))
    out, n_B, finished = fin(out, n_B, x_B[:, None], jnp.where(done_B, 0, 1))
    return cache, x_B, out, n_B, done_B | finished, step + 1

  state = (cache, x_B, out, n_B, done_B, jnp.zeros((), jnp.int32))
  cache, _, out, n_B, _, steps = jax.lax.while_loop(lambda s: ~jnp.all(s[4]), body, state)
  return Output(finish(out, n_B, max_new, pad_id), n_B, {"trunk_calls": steps + 1}, cache)


generate_jit = jax.jit(generate, static_argnames=("cfg", "max_new", "pad_id", "use_cache", "head"))
