"""The trunk's cache mode (models/transformer.py KVCache, driven by decoding/kv_cache.py) against the full
training forward: prefill, one-token and multi-token extends across EOS boundaries and a rejected-draft
rollback give the training h to float32 noise, scanned and unscanned, and with the "flash" training
forward; `attention_impl` reaches the cached attention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlat_jax.data import packing
from nextlat_jax.decoding import kv_cache as kc
from nextlat_jax.models.transformer import ModelConfig, Transformer

V, D, EOS, L = 16, 32, 1, 2
B, N, P, SLOTS = 3, 20, 8, 32  # rows, final committed tokens per row, prompt width, cache slots
PROMPT_LEN = np.array([5, 2, 7], np.int32)
REL = 1e-5  # float32 noise: the cached attention reduces over S slots, the training one over T tokens


def _cfg(scan: bool, **kw) -> ModelConfig:
  return ModelConfig(vocab_size=V, d_model=D, n_layer=L, n_head=2, init_std=0.2, scan_layers=scan, **kw)


@pytest.fixture(scope="module")
def params():
  """Scanned params (init std 0.2: peaked attention, so a wrong slot or mask shows) and the same weights
  in the unscanned layout."""
  x = jnp.zeros((1, 2), jnp.int32)
  scanned = nn.unbox(Transformer(_cfg(True)).init(jax.random.PRNGKey(0), x, x, x)["params"])
  unscanned = {k: v for k, v in scanned.items() if k != "blocks"}
  for i in range(L):
    unscanned[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], scanned["blocks"])
  return {True: scanned, False: unscanned}


def _sequence() -> np.ndarray:
  """(B, N) committed tokens: documents restart at EOS inside prompts, at a prompt's end, at a row's
  first token and inside / at the start of extend blocks."""
  seq = np.random.default_rng(0).integers(2, V, (B, N)).astype(np.int32)
  seq[0, [3, 6, 11]] = EOS  # inside the prompt; the first token of a 3-block; of the next 3-block
  seq[1, [1, 4, 10]] = EOS  # the prompt's last token; inside a 3-block; the first kept draft
  seq[2, [0, 9, 13, 14]] = EOS  # the row's first token; inside the 3-block; a kept draft; a 1-token step
  return seq


def _close(got: np.ndarray, want: np.ndarray, what: str):
  err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  assert err <= REL * scale, (what, err, scale)


@pytest.mark.parametrize("scan,impl", [(True, None), (False, None), (True, "flash")])
def test_cached_forward_equals_the_training_forward(params, scan, impl):
  """impl "flash": the training forward runs the Pallas kernel (interpret mode), the cache the dense path."""
  cfg, p = _cfg(scan, attention_impl=impl), params[scan]
  seq = _sequence()
  seg, pos = packing.segment_ids_and_positions(seq, EOS)
  full_BxNxD = np.asarray(Transformer(cfg).apply({"params": p}, jnp.asarray(seq), seg, pos)[0])
  prefill = jax.jit(kc.prefill, static_argnames=("cfg", "size"))
  extend = jax.jit(kc.extend, static_argnames="cfg")

  prompt = np.full((B, P), 7, np.int32)  # padding past each prompt: scratch slots, overwritten later
  for b in range(B):
    prompt[b, :PROMPT_LEN[b]] = seq[b, :PROMPT_LEN[b]]
  h, cache = prefill(p, cfg, jnp.asarray(prompt), jnp.asarray(PROMPT_LEN), EOS, SLOTS)
  for b in range(B):
    _close(np.asarray(h)[b, :PROMPT_LEN[b]], full_BxNxD[b, :PROMPT_LEN[b]], f"prefill row {b}")
  n = PROMPT_LEN.copy()
  rng = np.random.default_rng(1)
  # (block length, tokens kept per row): kept < block is a speculative round whose tail is rejected
  steps = [(1, None), (3, None), (4, np.array([1, 0, 3])), (1, None), (3, None), (4, np.array([4, 2, 0])),
           (1, None)]
  for T, keep in steps:
    kept = np.full(B, T) if keep is None else keep
    block = rng.integers(2, V, (B, T)).astype(np.int32)  # rejected drafts: random tokens
    for b in range(B):
      block[b, :kept[b]] = seq[b, n[b]:n[b] + kept[b]]
    h, cache = extend(p, cfg, cache, jnp.asarray(block), EOS)
    for b in np.flatnonzero(kept):  # kept tokens see only the committed prefix (stale slots, drafts masked)
      _close(np.asarray(h)[b, :kept[b]], full_BxNxD[b, n[b]:n[b] + kept[b]], f"T={T} row {b}")
    n = n + kept
    cache = kc.rollback(cache, jnp.asarray(n))
  assert n.max() <= N and n.min() >= 8
  # the slot bookkeeping is the batch contract's
  for b in range(B):
    np.testing.assert_array_equal(np.asarray(cache.tokens_BxS)[b, :n[b]], seq[b, :n[b]])
    np.testing.assert_array_equal(np.asarray(cache.segment_BxS)[b, :n[b]], seg[b, :n[b]])
    np.testing.assert_array_equal(np.asarray(cache.position_BxS)[b, :n[b]], pos[b, :n[b]])


def test_scanned_and_unscanned_caches_agree(params):
  """Both layouts write the same K/V (layer order included) for the same weights."""
  tokens = jnp.asarray(_sequence()[:, :P])
  caches = [jax.jit(kc.prefill, static_argnames=("cfg", "size"))(params[s], _cfg(s), tokens,
                                                                  jnp.asarray(PROMPT_LEN), EOS, SLOTS)[1]
            for s in (True, False)]
  for name in ("k_LxBxSxNxH", "v_LxBxSxNxH"):
    a, b = (np.asarray(getattr(c, name)) for c in caches)
    _close(a, b, name)


def test_attention_impl_reaches_the_cached_attention(params, monkeypatch):
  seen = []
  original = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kw):
    seen.append(implementation)
    return original(*args, implementation=implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  tokens = jnp.asarray(_sequence()[:, :P])
  out = {}
  for impl in ("xla", None):  # None: XLA picks (may be a cached trace, so only the results are compared)
    seen.clear()
    cfg = _cfg(True, attention_impl=impl)
    h, cache = jax.jit(kc.prefill, static_argnames=("cfg", "size"))(params[True], cfg, tokens,
                                                                    jnp.asarray(PROMPT_LEN), EOS, SLOTS)
    h1, _ = jax.jit(kc.extend, static_argnames="cfg")(params[True], cfg, cache, tokens[:, :1], EOS)
    if impl == "xla":  # prefill and the one-token extend were traced with it, and with nothing else
      assert seen and set(seen) == {"xla"}, seen
    out[impl] = np.asarray(h), np.asarray(h1)
  for got, want in zip(out["xla"], out[None]):
    _close(got, want, "xla vs default")
