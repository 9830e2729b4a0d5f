"""Hand-built packed rows for the tests that compare sharded runs and loss references."""
import numpy as np


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
