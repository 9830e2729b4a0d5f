"""Checks of config.model (the trunk): its own values, and its widths against the mesh. Called by
`nextlat_jax.config.validate`; each raises ConfigError for the first bad value."""
from __future__ import annotations

from typing import Any

from nextlat_jax.errors import need
from nextlat_jax.models.attention import IMPLS as ATTENTION_IMPLS
from nextlat_jax.models.transformer import DTYPES, REMAT_POLICIES, ffn_width


def validate(config: Any, data_vocab: int | None = None) -> None:
  """config.model; `data_vocab` (the dataset's vocabulary, when known) bounds model.vocab_size below."""
  m = config.model
  for key in ("d_model", "n_layer", "n_head"):
    need(int(m[key]) >= 1, f"model.{key}", m[key], "must be >= 1")
  need(m.d_model % m.n_head == 0, "model.d_model", m.d_model, f"must be divisible by model.n_head={m.n_head}")
  need((m.d_model // m.n_head) % 2 == 0, "model.n_head", m.n_head, "head_dim must be even for RoPE")
  need(m.vocab_size >= 1, "model.vocab_size", m.vocab_size, "must be >= 1")
  need(int(m.ffn_width) >= 0, "model.ffn_width", m.ffn_width, "must be >= 0 (0: the reference's width)")
  need(ffn_width(m.d_model, m.ffn_width) >= 1, "model.ffn_width", m.ffn_width,
       f"0 gives 128 * round(8 * d_model / 3 / 128) = 0 for d_model={m.d_model}; set a width")
  if data_vocab is not None:
    need(m.vocab_size >= data_vocab, "model.vocab_size", m.vocab_size,
         f"smaller than the dataset's vocabulary ({data_vocab})")
  need(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"must be one of {REMAT_POLICIES}")
  for key in ("dtype", "param_dtype"):
    need(m[key] in DTYPES, f"model.{key}", m[key], f"must be one of {tuple(DTYPES)}")
  need(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
       f"must be one of {ATTENTION_IMPLS} (nextlat_jax/models/attention.py)")


def validate_sharding(config: Any, fsdp: int, tensor: int) -> None:
  """The trunk's sharded widths divide by the mesh axes they are sharded over (parallel/sharding.py)."""
  m = config.model
  ffn = ffn_width(m.d_model, m.ffn_width)
  for key, size, axis, n in (("model.n_head", m.n_head, "mesh.tensor", tensor),
                             ("model.vocab_size", m.vocab_size, "mesh.tensor", tensor),
                             ("model.ffn_width (SwiGLU width)", ffn, "mesh.tensor", tensor),
                             ("model.d_model", m.d_model, "mesh.fsdp", fsdp)):
    need(size % n == 0, key, size, f"must be divisible by {axis}={n} (it is sharded over that axis)")
