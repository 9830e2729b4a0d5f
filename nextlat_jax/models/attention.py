"""Attention over packed documents: `attend`, the one call `Block` makes, for every `model.attention_impl`.

Implementations (`IMPLS`; "auto" is resolved at trace time from `jax.default_backend()` by `resolve`):
  None     `jax.nn.dot_product_attention(implementation=None)` on a dense (B, 1, T, T) document mask: JAX
           picks (cuDNN where it applies, else XLA). The default; the trunk's numerics before this module.
  "xla"    the same call with implementation="xla" (what None picks on CPU).
  "cudnn"  the same call with implementation="cudnn" (GPU only, float16 / bfloat16, as JAX requires).
  "flash"  a Pallas flash-attention kernel fed the segment ids and causality, so no T x T mask is built:
           GPU: the Triton kernel `jax.experimental.pallas.ops.gpu.attention.mha` (fused backward, a custom
                VJP that takes the segment ids); tiles `TRITON_BLOCKS` (q/k 128, backward 32).
           TPU: `jax.experimental.pallas.ops.tpu.splash_attention` (a CausalMask and SegmentIds), tiles of
                `SPLASH_BLOCK`. Untested on a TPU: only its shapes / numerics in Pallas interpret mode on CPU.
           CPU: the GPU kernel in Pallas interpret mode (slow: how it is tested).
  "auto"   "flash" on GPU and TPU, "xla" on CPU.
Both kernels scale the logits by 1/sqrt(H) as `jax.nn.dot_product_attention` does. T is padded up to the
kernels' tile multiple; the padded tail gets segment id `PAD_SEGMENT` (matches no real token, padding's -1
included) and sits after every real position, so causality alone already hides it; its rows attend to
themselves (no empty softmax) and are sliced off. Padding tokens (segment id < 0) attend among themselves
as under the dense mask (`document_mask` compares ids), so neither path has an empty row: no NaN.

Dense masks (cache mode): in decoding the queries sit at slots start_B[b] + t of an S-slot KV buffer and
see an arbitrary slot mask (`KVCache.mask_Bx1xTxS`: committed prefix, stale and rejected slots masked), no
segment-id / causal structure aligned at 0. The installed Pallas decode kernels
(`pallas/ops/gpu/decode_attention.py`: one query per row over a contiguous [start, length) window) cannot
express it, so whenever `attend` is given a mask, "flash" (and "auto" where it means flash) runs
`jax.nn.dot_product_attention(implementation=None)` on it: a documented routing, taken at every step and
logged nowhere, not a fallback on error. Decode steps attend T (1 .. a few) queries over S slots, which is
memory-bound; a fused kernel would save little there.

Under a mesh the kernel runs per shard (`jax.shard_map`, rows over the batch axes and heads over the axes
of `activation_heads`, every row's whole sequence local): a pallas_call has no SPMD partitioning rule.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array
IMPLS = (None, "xla", "cudnn", "flash", "auto")
KERNELS = ("triton", "splash")
PAD_SEGMENT = int(np.iinfo(np.int32).min)  # the padded tail's segment id
TRITON_BLOCKS = triton_attention.BlockSizes.get_default()  # q/k tiles 128, backward tiles 32
TRITON_MIN_BLOCK = 16  # Triton's smallest dot tile
_TRITON_TILES = ("block_q", "block_k", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")
SPLASH_BLOCK = 128  # a multiple of the TPU's 128 lanes
NAMES_BxTxNxH = ("activation_batch", "activation_length", "activation_heads", None)


def resolve(impl: str | None, backend: str | None = None) -> str | None:
  """`impl` with "auto" replaced by the backend's pick: "flash" on GPU / TPU, "xla" on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r}: must be one of {IMPLS}")
  if impl != "auto":
    return impl
  return "flash" if (backend or jax.default_backend()) in ("gpu", "tpu") else "xla"


def uses_segment_ids(impl: str | None) -> bool:
  """Whether `impl` (resolved here) attends from segment ids (a kernel) rather than a dense mask."""
  return resolve(impl) == "flash"


def document_mask(segment_ids_BxT: Array) -> Array:
  """Block-diagonal causal mask (B, 1, T, T): t attends to s iff s <= t and same document."""
  T = segment_ids_BxT.shape[1]
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
  return (same_BxTxT & causal_TxT)[:, None]


def attend(q_BxTxNxH: Array, k_BxSxNxH: Array, v_BxSxNxH: Array, *, impl: str | None,
           segment_ids_BxT: Array | None = None, mask_Bx1xTxS: Array | None = None, mesh: Mesh | None = None,
           rules: tuple = (), kernel: str | None = None, block: int | None = None) -> Array:
  """softmax(q k^T / sqrt(H)) v over what each query sees: `mask_Bx1xTxS` when given (dense, any impl),
  else block-diagonal causal over `segment_ids_BxT` (S = T). `kernel` ("triton" | "splash"; None: the
  backend's) and `block` (every tile of the kernel; None: its defaults) only matter for "flash"."""
  impl = resolve(impl)
  if mask_Bx1xTxS is not None or impl != "flash":
    if mask_Bx1xTxS is None:
      mask_Bx1xTxS = document_mask(segment_ids_BxT)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask=mask_Bx1xTxS,
                                        implementation=None if impl == "flash" else impl)
  if segment_ids_BxT is None:
    raise ValueError("attention: neither a mask nor segment ids given")
  return flash(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, segment_ids_BxT, mesh=mesh, rules=rules, kernel=kernel,
               block=block)


def flash(q_BxTxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, segment_ids_BxT: Array, *,
          mesh: Mesh | None = None, rules: tuple = (), kernel: str | None = None,
          block: int | None = None) -> Array:
  """Block-diagonal causal attention by a Pallas kernel (interpret mode on CPU), per shard under a mesh."""
  kernel = kernel or ("splash" if jax.default_backend() == "tpu" else "triton")
  if kernel not in KERNELS:
    raise ValueError(f"flash attention kernel {kernel!r}: must be one of {KERNELS}")
  if block is not None and (block < 1 or block & (block - 1)):
    raise ValueError(f"flash attention block {block}: must be a power of two")
  local = functools.partial(_splash if kernel == "splash" else _triton, block=block,
                            interpret=jax.default_backend() == "cpu")
  segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
  if mesh is None:
    return local(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)
  batch, _, heads, _ = nn.logical_to_mesh_axes(NAMES_BxTxNxH, rules)
  spec, seg_spec = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                       check_vma=False)(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad(T_pad: int, q_BxTxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, segment_ids_BxT: Array):
  """q, k, v zero-padded and segment ids `PAD_SEGMENT`-padded from T to T_pad positions."""
  extra = T_pad - q_BxTxNxH.shape[1]
  if extra == 0:
    return q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT
  q, k, v = (jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0))) for a in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH))
  return q, k, v, jnp.pad(segment_ids_BxT, ((0, 0), (0, extra)), constant_values=PAD_SEGMENT)


def triton_blocks(T: int, block: int | None = None) -> triton_attention.BlockSizes:
  """The Triton kernel's tiles for T positions: `block` everywhere, else `TRITON_BLOCKS`, each capped at
  T's next power of two (at least `TRITON_MIN_BLOCK`) so a short row is not padded to a full tile. All
  are powers of two, so T padded to the largest is a multiple of each (the fused backward also needs as
  many q tiles as k tiles: block_q_dq == block_kv_dkv)."""
  cap = max(TRITON_MIN_BLOCK, 1 << max(0, T - 1).bit_length())
  return triton_attention.BlockSizes(**{f: min(block or getattr(TRITON_BLOCKS, f), cap) for f in _TRITON_TILES})


def _triton(q_BxTxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, segment_ids_BxT: Array, *,
            block: int | None, interpret: bool) -> Array:
  B, T, N, H = q_BxTxNxH.shape
  sizes = triton_blocks(T, block)
  T_pad = _round_up(T, max(getattr(sizes, f) for f in _TRITON_TILES))
  q, k, v, seg = _pad(T_pad, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)
  o_BxTxNxH = triton_attention.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(H), causal=True, block_sizes=sizes,
                                   interpret=interpret)
  return o_BxTxNxH[:, :T]


def _splash(q_BxTxNxH: Array, k_BxTxNxH: Array, v_BxTxNxH: Array, segment_ids_BxT: Array, *,
            block: int | None, interpret: bool) -> Array:
  """Splash attention (TPU; untested on one here), vmapped over rows in its (N, T, H) layout. It does not
  scale the logits: q is scaled first."""
  B, T, N, H = q_BxTxNxH.shape
  b = block or SPLASH_BLOCK
  T_pad = _round_up(T, b)
  q, k, v, seg = _pad(T_pad, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT)
  mask = splash.MultiHeadMask([splash.CausalMask((T_pad, T_pad)) for _ in range(N)])
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                            block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  kern = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(H))).astype(q.dtype)
  heads_major = lambda a: a.transpose(0, 2, 1, 3)  # BxTxNxH <-> BxNxTxH
  o_BxNxTxH = jax.vmap(kern)(heads_major(q), heads_major(k), heads_major(v),
                             segment_ids=splash.SegmentIds(q=seg, kv=seg))
  return heads_major(o_BxNxTxH)[:, :T]
