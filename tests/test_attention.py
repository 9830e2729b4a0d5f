"""models/attention.py: the "flash" Pallas kernels (interpret mode on CPU) against the dense "xla" path on
packed rows with a padding tail, forward and gradients; T not a multiple of the tile; the trunk with
attention_impl="flash" against "xla" (h and every parameter gradient, no T x T mask traced); a mesh.

Tolerance: REL = 1e-5 of each tensor's max |value|. Both paths are float32 with float32 accumulation; they
differ only in summation order and in the kernels' exp2(x log2 e) online softmax, so errors sit at a few
float32 ulps (measured: <= 1e-6 relative for o, dq, dk, dv; <= 2.3e-6 for the 2-layer trunk's parameter
gradients, the error compounding through the layers); a wrong mask, scale or padded tile shows at 1e-2 .. 1.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.sharding import Mesh

from nextlat_jax.data import packing
from nextlat_jax.models import attention
from nextlat_jax.models.transformer import ModelConfig, Transformer
from nextlat_jax.parallel.sharding import DEFAULT_RULES

B, N, H = 2, 2, 16
REL = 1e-5


def _segments(T: int) -> np.ndarray:
  """(B, T) packed rows: several documents per row, a padding tail (-1) of 5 and 3 positions."""
  seg = np.zeros((B, T), np.int32)
  seg[0, T // 3:], seg[0, T // 2:], seg[0, T - 5:] = 1, 2, -1
  seg[1, 1:], seg[1, T // 2:], seg[1, T - 3:] = 4, 7, -1
  return seg


def _qkv(T: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(2.0 * rng.normal(size=(B, T, N, H)), jnp.float32) for _ in range(4))


def _close(got, want, what: str) -> float:
  got, want = np.asarray(got), np.asarray(want)
  assert np.isfinite(got).all(), what
  err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
  assert err <= REL * scale, (what, err, scale)  # both all-zero (e.g. the unused head's gradient): err == 0
  return err / scale if scale else err


def _compare(T: int, **flash_kw):
  """Output and d/dq, d/dk, d/dv of sum(o * w) of "flash" vs "xla" on packed rows of length T."""
  q, k, v, w = _qkv(T)
  seg = jnp.asarray(_segments(T))

  def loss(impl, q, k, v):
    o = attention.attend(q, k, v, impl=impl, segment_ids_BxT=seg, **(flash_kw if impl == "flash" else {}))
    return jnp.sum(o * w), o

  grad = {impl: jax.jit(jax.grad(lambda q, k, v, impl=impl: loss(impl, q, k, v), argnums=(0, 1, 2),
                                 has_aux=True))(q, k, v) for impl in ("flash", "xla")}
  (g_flash, o_flash), (g_xla, o_xla) = grad["flash"], grad["xla"]
  errs = [_close(o_flash, o_xla, "o")]
  errs += [_close(a, b, f"d{name}") for a, b, name in zip(g_flash, g_xla, "qkv")]
  return errs


@pytest.mark.parametrize("T", [16, 24, 37])
def test_triton_kernel_matches_xla(T):
  """Tiles of 8: 2, 3 and 5 (37 padded to 40) tiles per row in the forward and both backward scans."""
  _compare(T, kernel="triton", block=8)


def test_splash_kernel_matches_xla():
  """The TPU kernel (splash) in Pallas interpret mode: 37 positions padded to one 128 tile. Not a TPU run."""
  _compare(37, kernel="splash")


def test_triton_tiles_and_padding():
  for T, want in ((5, (16, 16, 16)), (24, (32, 32, 32)), (37, (64, 64, 32)), (256, (128, 128, 32)),
                  (300, (128, 128, 32))):
    s = attention.triton_blocks(T)
    assert (s.block_q, s.block_k, s.block_q_dq) == want, T
    assert s.block_q_dq == s.block_kv_dkv
  assert attention.triton_blocks(37, 8).block_q == 8
  with pytest.raises(ValueError, match="power of two"):
    attention.flash(*_qkv(8)[:3], jnp.zeros((B, 8), jnp.int32), block=12)


def test_auto_picks_per_backend():
  assert [attention.resolve("auto", b) for b in ("gpu", "tpu", "cpu")] == ["flash", "flash", "xla"]
  assert attention.resolve("auto") == "xla"  # this session's backend
  assert [attention.resolve(i) for i in (None, "xla", "cudnn", "flash")] == [None, "xla", "cudnn", "flash"]
  with pytest.raises(ValueError, match="attention impl"):
    attention.resolve("triton")


def test_flash_given_a_mask_takes_the_dense_path(monkeypatch):
  """Cache mode's routing: with a mask, "flash" calls jax.nn.dot_product_attention (JAX picks)."""
  seen = []
  original = jax.nn.dot_product_attention

  def recording(*args, implementation="unset", **kw):
    seen.append(implementation)
    return original(*args, implementation=implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v, _ = _qkv(8)
  mask = attention.document_mask(jnp.asarray(_segments(8)))
  o = attention.attend(q, k, v, impl="flash", mask_Bx1xTxS=mask)
  assert seen == [None]
  np.testing.assert_array_equal(o, original(q, k, v, mask=mask, implementation="xla"))


def _model_cfg(impl):
  return ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, init_std=0.2, attention_impl=impl)


def test_transformer_flash_equals_xla(monkeypatch):
  """A packed batch (EOS restarts, a padding tail): same h and parameter gradients; Triton tiles of 8 (3
  per row); the flash trace holds no (B, 1, T, T) mask, the xla one does."""
  monkeypatch.setattr(attention, "TRITON_BLOCKS", triton_attention.BlockSizes(*(8,) * 6))
  T, EOS = 24, 1
  tokens = np.random.default_rng(0).integers(2, 64, (B, T)).astype(np.int32)
  tokens[0, [5, 11]], tokens[1, [0, 17]] = EOS, EOS
  seg, pos = packing.segment_ids_and_positions(tokens, EOS)
  seg, pos = np.array(seg), np.array(pos)
  seg[0, -4:], pos[0, -4:] = -1, 0  # a padding tail
  x = jnp.zeros((1, 2), jnp.int32)  # random weights from numpy: compiling jax.random init is slow on CPU
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(_model_cfg("xla")).init(jax.random.PRNGKey(0), x, x, x)))
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(  # weights N(0, 0.2): peaked attention; norm scales 1 + N(0, 0.2)
      lambda path, s: jnp.asarray((jax.tree_util.keystr(path).endswith("['scale']")) + 0.2 * rng.normal(size=s.shape),
                                  s.dtype), shapes["params"])
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, 32)), jnp.float32)
  args = tuple(jnp.asarray(a) for a in (tokens, seg, pos))

  def loss(p, impl):
    h = Transformer(_model_cfg(impl)).apply({"params": p}, *args)[0]
    return jnp.sum(h * w), h

  traced = {impl: jax.jit(jax.grad(lambda p, impl=impl: loss(p, impl), has_aux=True)).trace(params)
            for impl in ("flash", "xla")}
  out = {impl: t.lower().compile()(params) for impl, t in traced.items()}
  _close(out["flash"][1], out["xla"][1], "h")
  flat_flash, flat_xla = (jax.tree_util.tree_leaves_with_path(out[i][0]) for i in ("flash", "xla"))
  for (path, a), (_, b) in zip(flat_flash, flat_xla):
    _close(a, b, jax.tree_util.keystr(path))
  mask_type = f"bool[{B},1,{T},{T}]"
  assert mask_type in str(traced["xla"].jaxpr) and mask_type not in str(traced["flash"].jaxpr)


def test_flash_under_a_mesh_runs_per_shard():
  """shard_map over batch (fsdp=2) and heads (tensor=2) gives the unsharded kernel's output."""
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
  q, k, v, _ = _qkv(16)
  seg = jnp.asarray(_segments(16))
  f = lambda m: jax.jit(lambda q, k, v: attention.flash(q, k, v, seg, mesh=m, rules=DEFAULT_RULES, block=8))
  sharded = f(mesh)(q, k, v)
  np.testing.assert_allclose(sharded, f(None)(q, k, v), rtol=0, atol=1e-6)
  _close(sharded, attention.attend(q, k, v, impl="xla", segment_ids_BxT=seg), "sharded o")
