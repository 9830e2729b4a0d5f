"""The tiny model config and hand-built packed rows of the tests that compare sharded runs with one
device and losses with references."""
import ml_collections
import numpy as np

from nextlat_jax.config import base_config


def tiny_config(shape=(1, 1, 1), *, vocab: int, d_model: int, batch: int, eos: int, dynamics_hidden: int = 48,
                init_std: float = 0.02) -> ml_collections.ConfigDict:
  """A 2-layer, 4-head NextLat model (SwiGLU width 64, lambda 1/1) on the mesh `shape` = (data, fsdp,
  tensor), 10 steps of `batch` rows; callers set the objective, optimizer and dynamics details."""
  c = base_config()
  c.model.update(vocab_size=vocab, d_model=d_model, n_layer=2, n_head=4, ffn_width=64, init_std=init_std)
  c.dynamics.hidden = dynamics_hidden
  c.objective.update(name="nextlat", lambda_next_h=1.0, lambda_kl=1.0)
  c.data = ml_collections.ConfigDict({"eos_id": eos})
  c.batch_size, c.steps = batch, 10
  c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  return c


def contract_fields(tokens_BxL: np.ndarray, valid_BxL: np.ndarray, eos: int, pad: int = 0) -> dict:
  """The batch contract (METHOD §2) for rows with EOS crossings: padding (valid False) becomes `pad`
  with segment id -1; each document's tokens at positions 1..2 are prompt (context_length 1 style)."""
  tokens = np.where(valid_BxL, tokens_BxL, pad)
  t, is_eos = np.arange(tokens.shape[1]), tokens == eos
  positions = t - np.maximum.accumulate(np.where(is_eos, t, -1), axis=1)
  loss_mask = valid_BxL & (t >= 1) & ~((positions >= 1) & (positions <= 2))
  return {"tokens": tokens.astype(np.int32),
          "segment_ids": np.where(valid_BxL, np.cumsum(is_eos, axis=1), -1).astype(np.int32),
          "positions": np.where(valid_BxL, positions, 0).astype(np.int32),
          "loss_mask": loss_mask.astype(np.int32)}


def random_rows(rng: np.random.Generator, B: int, L: int, V: int, eos: int, eos_rate: float) -> np.ndarray:
  """Tokens in [2, V) with EOS at rate `eos_rate`."""
  tokens = rng.integers(2, V, size=(B, L))
  tokens[rng.random((B, L)) < eos_rate] = eos
  return tokens
