"""Trunk tests: Hugging Face Llama parity, packed rows, weight round trips, parameter counts, init, RoPE.

METHOD.md §1-4. The HF tests run torch on CPU in float32 with eager attention and skip cleanly when torch
or transformers is missing.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax.config import base_config
from nextlat_jax.data.packing import pack_row_fields
from nextlat_jax.interop.hf_llama import from_hf_llama_state_dict, hf_llama_config_dict, to_hf_llama_state_dict
from nextlat_jax.models.transformer import ModelConfig, Transformer, document_mask, ffn_width, rope, unembed
from nextlat_jax.objectives.gpt import trunk_module
from nextlat_jax.objectives.nextlat import dynamics_module

EOS = 1
SMALL = dict(vocab_size=97, d_model=64, n_layer=3, n_head=4)


def _cfg(**kw) -> ModelConfig:
  return ModelConfig(**{**SMALL, **kw})


def _random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.125, scale_noise: float = 0.2,
                   boxed: bool = False):
  """Random trunk params in the layout Transformer.init gives (shapes from eval_shape; values from numpy).

  Weights ~ N(0, std) (0.125 = 1/sqrt(64): O(1) logits and peaked attention, so a mismatch shows), norm
  scales 1 + N(0, scale_noise) (non-unit scales catch a swapped or transposed norm weight). Filling with
  numpy avoids compiling jax.random for rank-4 shapes, which is slow on XLA:CPU.
  """
  x = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), x, x, x)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if "'scale'" in jax.tree_util.keystr(path):  # also under a LogicallyPartitioned box
      v = 1.0 + scale_noise * rng.standard_normal(s.shape)
    else:
      v = std * rng.standard_normal(s.shape)
    return v.astype(s.dtype)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return params if boxed else nn.unbox(params)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg: ModelConfig):
  model = Transformer(cfg)

  def apply(params, tokens, segment_ids, positions):
    h, _ = model.apply({"params": params}, tokens, segment_ids, positions)
    return h, unembed(h, params["head"])
  return jax.jit(apply)


def _forward(cfg: ModelConfig, params, tokens, segment_ids, positions):
  """(h, logits) as numpy for (B, T) or (T,) int inputs."""
  args = (jnp.asarray(np.atleast_2d(a), jnp.int32) for a in (tokens, segment_ids, positions))
  h, logits = _apply_fn(cfg)(params, *args)
  assert h.dtype == logits.dtype == jnp.float32
  return np.asarray(h), np.asarray(logits)


def _logits(cfg: ModelConfig, params, tokens, segment_ids, positions) -> np.ndarray:
  return _forward(cfg, params, tokens, segment_ids, positions)[1]


def _hf_model(cfg: ModelConfig, params):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(**hf_llama_config_dict(cfg), attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  sd = {k: torch.from_numpy(v) for k, v in to_hf_llama_state_dict(params, cfg).items()}
  assert set(sd) == set(model.state_dict())
  model.load_state_dict(sd, strict=True)
  return model


def _hf_logits(model, tokens, positions) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.atleast_2d(tokens), dtype=torch.long),
                position_ids=torch.tensor(np.atleast_2d(positions), dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


def _tokens(rng: np.random.Generator, shape) -> np.ndarray:
  return rng.integers(2, SMALL["vocab_size"], size=shape).astype(np.int32)  # never EOS


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------- HF parity

@pytest.mark.parametrize("scan,rope_base", [(True, 10000.0), (False, 500.0)])
def test_hf_llama_parity_single_document(scan, rope_base):
  cfg = _cfg(scan_layers=scan, rope_base=rope_base)
  params = _random_params(cfg, seed=1)
  model = _hf_model(cfg, params)
  tokens = _tokens(np.random.default_rng(0), (2, 24))
  positions = np.broadcast_to(np.arange(1, 25, dtype=np.int32), tokens.shape)  # first segment: t + 1
  ours = _logits(cfg, params, tokens, np.zeros_like(tokens), positions)
  theirs = _hf_logits(model, tokens, positions)
  assert ours.shape == theirs.shape == (2, 24, 97)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hf_llama_parity_packed_row():
  cfg = _cfg(scan_layers=True)
  params = _random_params(cfg, seed=2)
  model = _hf_model(cfg, params)
  rng = np.random.default_rng(1)
  doc_a, doc_b = _tokens(rng, 7), np.concatenate([[EOS], _tokens(rng, 8)]).astype(np.int32)
  row = np.concatenate([doc_a, doc_b])
  seg = np.array([0] * 7 + [1] * 9, np.int32)  # the EOS opens (belongs to) the second document
  pos = np.array(list(range(1, 8)) + list(range(0, 9)), np.int32)  # METHOD §2
  fields = pack_row_fields(row, EOS, context_length=None)  # the data pipeline agrees
  np.testing.assert_array_equal(fields["segment_ids"], seg)
  np.testing.assert_array_equal(fields["positions"], pos)
  packed = _logits(cfg, params, row, seg, pos)[0]

  hf_a = _hf_logits(model, doc_a, np.arange(1, 8))[0]
  hf_b = _hf_logits(model, doc_b, np.arange(0, 9))[0]
  np.testing.assert_allclose(packed[:7], hf_a, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(packed[7:], hf_b, atol=1e-4, rtol=1e-4)

  own_a = _logits(cfg, params, doc_a, np.zeros(7), np.arange(1, 8))[0]
  own_b = _logits(cfg, params, doc_b, np.zeros(9), np.arange(0, 9))[0]
  np.testing.assert_allclose(packed[:7], own_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed[7:], own_b, atol=1e-5, rtol=1e-5)
  # Without the document mask the second document would see the first: make sure that differs.
  leaky = _logits(cfg, params, row, np.zeros(16), pos)[0]
  assert np.abs(leaky[8:] - packed[8:]).max() > 1e-3


def test_hf_config_dict_builds_matching_llama_config():
  transformers = pytest.importorskip("transformers")
  cfg = _cfg(rope_base=1234.0, norm_eps=1e-6)
  d = hf_llama_config_dict(cfg, max_position_embeddings=4096, eos_token_id=EOS)
  c = transformers.LlamaConfig(**d)
  assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
          c.num_key_value_heads, c.head_dim, c.vocab_size) == (64, cfg.ffn, 3, 4, 4, 16, 97)
  assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 4096 and c.eos_token_id == EOS
  assert not c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias and c.hidden_act == "silu"
  theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
  assert theta == 1234.0


# ------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_exact(scan, param_dtype):
  cfg = _cfg(scan_layers=scan, param_dtype=param_dtype)
  params = _random_params(cfg, seed=3)
  sd = to_hf_llama_state_dict(params, cfg)
  assert all(v.flags["C_CONTIGUOUS"] for v in sd.values())
  assert sd["model.layers.2.self_attn.q_proj.weight"].shape == (64, 64)
  assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (cfg.ffn, 64)
  assert sd["lm_head.weight"].shape == sd["model.embed_tokens.weight"].shape == (97, 64)
  _assert_trees_equal(from_hf_llama_state_dict(sd, cfg), params)


def test_boxed_params_and_layout_conversion_give_same_logits():
  cfg_scan, cfg_unrolled = _cfg(scan_layers=True), _cfg(scan_layers=False)
  boxed = _random_params(cfg_scan, seed=4, boxed=True)
  assert isinstance(boxed["embed"], nn.LogicallyPartitioned)
  sd = to_hf_llama_state_dict(boxed, cfg_scan)
  unrolled = from_hf_llama_state_dict(sd, cfg_unrolled)
  assert "block_2" in unrolled and "blocks" not in unrolled
  _assert_trees_equal(to_hf_llama_state_dict(unrolled, cfg_unrolled), sd)
  tokens = _tokens(np.random.default_rng(2), (2, 12))
  seg, pos = np.zeros_like(tokens), np.broadcast_to(np.arange(1, 13), tokens.shape)
  a = _logits(cfg_scan, nn.unbox(boxed), tokens, seg, pos)
  b = _logits(cfg_unrolled, unrolled, tokens, seg, pos)
  np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_conversion_errors_are_clear():
  cfg = _cfg()
  params = _random_params(cfg)
  sd = to_hf_llama_state_dict(params, cfg)
  with pytest.raises(ValueError, match="tied embeddings"):
    from_hf_llama_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
  with pytest.raises(ValueError, match="has shape"):
    from_hf_llama_state_dict({**sd, "model.norm.weight": np.ones(63, np.float32)}, cfg)
  with pytest.raises(ValueError, match="unexpected"):
    from_hf_llama_state_dict({**sd, "model.layers.3.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"]}, cfg)
  with pytest.raises(ValueError, match="scan_layers=False"):
    to_hf_llama_state_dict(params, _cfg(scan_layers=False))
  with pytest.raises(ValueError, match="do not match"):
    to_hf_llama_state_dict(params, _cfg(n_layer=2))
  with pytest.raises(ValueError, match="float16"):
    hf_llama_config_dict(_cfg(dtype="float16"))
  with pytest.raises(ValueError, match="even"):
    hf_llama_config_dict(_cfg(d_model=60, n_head=4))  # head_dim 15
  # Old checkpoints carry the non-persistent rotary buffer: it is ignored.
  extra = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}
  _assert_trees_equal(from_hf_llama_state_dict(extra, cfg), params)


# ------------------------------------------------------------------------------ parameter counts

def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _config(vocab: int, layers: int, d: int, heads: int, dyn_hidden: int) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(vocab_size=vocab, n_layer=layers, d_model=d, n_head=heads)
  c.dynamics.hidden = dyn_hidden
  c.data = ml_collections.ConfigDict({"eos_id": 1})
  return c


@pytest.mark.parametrize("vocab,layers,d,heads,dyn_hidden,n_trunk,n_dyn", [
    (106, 12, 384, 6, 384, 21_324_672, 590_592),  # Path-Star
    (50304, 22, 2048, 16, 6528, 1_319_200_768, 82_726_912),  # FineWeb-Edu
    (60, 2, 512, 8, 1024, 6_486_528, 2_622_464),  # A5
])
@pytest.mark.parametrize("scan", [True, False])
def test_parameter_count_anchors(vocab, layers, d, heads, dyn_hidden, n_trunk, n_dyn, scan):
  c = _config(vocab, layers, d, heads, dyn_hidden)
  c.model.scan_layers = scan
  x = jnp.zeros((1, 2), jnp.int32)
  trunk = trunk_module(c)
  shapes = jax.eval_shape(lambda: nn.unbox(trunk.init(jax.random.PRNGKey(0), x, x, x)["params"]))
  assert _count(shapes) == n_trunk
  dyn = dynamics_module(c)
  z = jnp.zeros((1, 1, d))
  dyn_shapes = jax.eval_shape(lambda: nn.unbox(dyn.init(jax.random.PRNGKey(0), z, z)["params"]))
  assert _count(dyn_shapes) == n_dyn == 2 * d * dyn_hidden + dyn_hidden ** 2 + dyn_hidden * d + 2 * d


# ---------------------------------------------------------------------------------------- init

def test_swiglu_width():
  for d, f in [(384, 1024), (512, 1408), (768, 2048), (2048, 5504)]:
    assert ffn_width(d) == f and ModelConfig(vocab_size=8, d_model=d, n_layer=1, n_head=8).ffn == f
  assert ModelConfig(vocab_size=8, d_model=384, n_layer=1, n_head=6, ffn_width=100).ffn == 100
  cfg = ModelConfig(vocab_size=8, d_model=512, n_layer=1, n_head=8)
  x = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), x, x, x)["params"]))
  assert shapes["blocks"]["mlp_in"]["kernel"].shape == (1, 512, 2, 1408)
  assert shapes["blocks"]["mlp_out"]["kernel"].shape == (1, 1408, 512)


def test_init_statistics():
  c = _config(vocab=1000, layers=2, d=384, heads=6, dyn_hidden=384)
  x = jnp.zeros((1, 2), jnp.int32)
  params = nn.unbox(jax.jit(trunk_module(c).init)(jax.random.PRNGKey(0), x, x, x)["params"])
  z = jnp.zeros((1, 1, 384))
  dyn = nn.unbox(jax.jit(dynamics_module(c).init)(jax.random.PRNGKey(1), z, z)["params"])
  weights, scales = {}, {}
  for tree, prefix in ((params, "trunk"), (dyn, "dyn")):
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = prefix + "/" + "/".join(str(getattr(k, "key", k)) for k in path)
      (scales if name.endswith("scale") else weights)[name] = np.asarray(a, np.float64)
  assert len(weights) == 6 + 3 and len(scales) == 3 + 1  # trunk + dynamics
  for name, a in weights.items():
    assert abs(a.std() / 0.02 - 1) < 0.05, (name, a.std())
    assert abs(a.mean()) < 1e-3, (name, a.mean())
  for name, a in scales.items():
    np.testing.assert_array_equal(a, 1.0, err_msg=name)
  # The two layers of the scanned stack get different draws; embed and head are untied.
  qkv = weights["trunk/blocks/qkv/kernel"]
  assert not np.allclose(qkv[0], qkv[1])
  assert not np.allclose(weights["trunk/embed"], weights["trunk/head"].T)


# ----------------------------------------------------------------------------------- RoPE / mask

def _np_rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """Independent Llama rotate-half reference in float64: x * cos + rotate_half(x) * sin."""
  H = x.shape[-1]
  inv_freq = base ** (-np.arange(0, H, 2, dtype=np.float64) / H)
  ang = positions[..., None].astype(np.float64) * inv_freq
  emb = np.concatenate([ang, ang], axis=-1)[:, :, None, :]
  x = x.astype(np.float64)
  rot = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], axis=-1)
  return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
  positions = np.stack([np.arange(9), np.array([1, 2, 3, 0, 1, 2, 0, 5, 100])]).astype(np.int32)
  for base in (10000.0, 500.0):
    out = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), base))
    np.testing.assert_allclose(out, _np_rope(x, positions, base), atol=2e-5, rtol=1e-5)
  out = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
  np.testing.assert_array_equal(out[0, 0], x[0, 0])  # position 0 is the identity
  # Scores depend only on the relative offset: <R_m q, R_n k> == <R_{m+s} q, R_{n+s} k>.
  q, k = x[:1, :1], x[1:, :1]
  def score(m, n):
    rq = np.asarray(rope(jnp.asarray(q), jnp.full((1, 1), m), 10000.0))
    rk = np.asarray(rope(jnp.asarray(k), jnp.full((1, 1), n), 10000.0))
    return (rq * rk).sum(-1)
  np.testing.assert_allclose(score(7, 3), score(27, 23), atol=1e-5)


def test_document_mask_hand_checked():
  # tokens: a b c EOS d EOS e  ->  doc ids 0 0 0 1 1 2 2
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2, 2]])
  mask = np.asarray(document_mask(seg))
  assert mask.shape == (1, 1, 7, 7) and mask.dtype == bool
  expected = np.array([
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0],
      [0, 0, 0, 1, 0, 0, 0],  # the first EOS sees only itself
      [0, 0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 1, 0],  # and so does the second
      [0, 0, 0, 0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_eos_hidden_state_is_document_independent():
  cfg = _cfg()
  params = _random_params(cfg, seed=5)
  rng = np.random.default_rng(3)
  rows = np.stack([np.concatenate([_tokens(rng, 5), [EOS], _tokens(rng, 2)]) for _ in range(2)]).astype(np.int32)
  seg = np.array([[0] * 5 + [1] * 3] * 2)
  pos = np.array([[1, 2, 3, 4, 5, 0, 1, 2]] * 2)
  assert not np.array_equal(rows[0, :5], rows[1, :5])
  h, _ = _forward(cfg, params, rows, seg, pos)
  alone, _ = _forward(cfg, params, [EOS], [0], [0])
  np.testing.assert_allclose(h[0, 5], h[1, 5], atol=1e-6)
  np.testing.assert_allclose(h[0, 5], alone[0, 0], atol=1e-5)
  assert np.abs(h[0, 4] - h[1, 4]).max() > 1e-2  # the first documents do differ


# ----------------------------------------------------------------------------------------- bf16

def test_bfloat16_compute_close_to_float32():
  cfg32, cfg16 = _cfg(), _cfg(dtype="bfloat16")
  params = _random_params(cfg32, seed=6, std=0.02, scale_noise=0.0)  # the real init's statistics
  tokens = _tokens(np.random.default_rng(4), (2, 16))
  seg, pos = np.zeros_like(tokens), np.broadcast_to(np.arange(1, 17), tokens.shape)
  ref = _logits(cfg32, params, tokens, seg, pos)
  low = _logits(cfg16, params, tokens, seg, pos)
  assert np.isfinite(low).all()
  np.testing.assert_allclose(low, ref, atol=5e-2, rtol=0)
  assert np.abs(low - ref).max() < 0.1 * ref.std()  # (measured: ~0.004 vs logit std ~0.16)
  assert np.abs(low - ref).max() > 0  # bf16 really ran
