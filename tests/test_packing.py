"""Packed-row fields (METHOD.md §2) on hand-built rows."""

import numpy as np
import pytest

from nextlat_jax.data import packing

EOS = 1
# Two walks `o d a b end` and `o d c end`, then a third cut off after its destination:
# t:        0   1   2  3  4    5   6   7  8    9  10
ROW = [20, 21, 5, 6, EOS, 22, 23, 7, EOS, 24, 25]
SEGMENT_IDS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
POSITIONS = [1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
# context_length=1 masks positions 1 and 2 (origin, destination); t=0 is never a target.
MASK_CTX1 = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]


def test_hand_row_two_eos():
  fields = packing.pack_row_fields(np.array(ROW), EOS, context_length=1)
  np.testing.assert_array_equal(fields['tokens'], ROW)
  np.testing.assert_array_equal(fields['segment_ids'], SEGMENT_IDS)
  np.testing.assert_array_equal(fields['positions'], POSITIONS)
  np.testing.assert_array_equal(fields['loss_mask'], MASK_CTX1)
  assert set(fields) == set(packing.FIELDS)
  assert all(v.dtype == np.int32 and v.shape == (len(ROW),) for v in fields.values())


def test_segment_ids_and_positions_function():
  seg, pos = packing.segment_ids_and_positions(np.array(ROW), EOS)
  np.testing.assert_array_equal(seg, SEGMENT_IDS)
  np.testing.assert_array_equal(pos, POSITIONS)


def test_layout_is_one_function_for_numpy_jax_and_cached_blocks():
  """The same layout from numpy, from jax under jit, and block by block continuing the previous
  token's (segment id, position), as the KV cache appends blocks, at every split point."""
  import jax
  import jax.numpy as jnp
  rows = np.array([ROW, ROW[::-1]])
  want_seg, want_pos = packing.segment_ids_and_positions(rows, EOS)
  got = jax.jit(lambda t: packing.segment_ids_and_positions(t, EOS))(jnp.asarray(rows))
  assert all(isinstance(a, jax.Array) and a.dtype == jnp.int32 for a in got)
  np.testing.assert_array_equal(got[0], want_seg)
  np.testing.assert_array_equal(got[1], want_pos)
  for cut in (1, 4, 5, 9):  # inside a document, at an EOS, just after one, near the end (eager: a compile per shape)
    seg, pos = packing.segment_ids_and_positions(jnp.asarray(rows[:, cut:]), jnp.int32(EOS),
                                                 want_seg[:, cut - 1], want_pos[:, cut - 1])
    np.testing.assert_array_equal(seg, want_seg[:, cut:])
    np.testing.assert_array_equal(pos, want_pos[:, cut:])


@pytest.mark.parametrize('context_length', [None, -1])
def test_prompt_masking_disabled(context_length):
  mask = packing.loss_mask(np.array(POSITIONS), context_length)
  np.testing.assert_array_equal(mask, [0] + [1] * (len(ROW) - 1))


def test_context_length_zero_masks_position_one_only():
  mask = packing.loss_mask(np.array(POSITIONS), 0)
  np.testing.assert_array_equal(mask, [0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1])


def test_eos_targets_always_trained():
  positions = np.array(POSITIONS)
  for context_length in range(6):
    mask = packing.loss_mask(positions, context_length)
    assert (mask[positions == 0] == 1).all()


def test_row_starting_with_eos():
  fields = packing.pack_row_fields(np.array([EOS, 30, 31, 32, EOS, 33]), EOS, context_length=1)
  np.testing.assert_array_equal(fields['segment_ids'], [1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(fields['positions'], [0, 1, 2, 3, 0, 1])
  np.testing.assert_array_equal(fields['loss_mask'], [0, 0, 0, 1, 1, 0])


def test_padding():
  tokens = np.array([20, 21, 5, EOS, 22, 0, 0])
  valid = tokens != 0
  fields = packing.pack_row_fields(tokens, EOS, context_length=1, valid=valid)
  np.testing.assert_array_equal(fields['segment_ids'], [0, 0, 0, 1, 1, -1, -1])
  np.testing.assert_array_equal(fields['positions'], [1, 2, 3, 0, 1, 0, 0])
  np.testing.assert_array_equal(fields['loss_mask'], [0, 0, 1, 1, 0, 0, 0])
  no_prompt_mask = packing.pack_row_fields(tokens, EOS, context_length=None, valid=valid)
  np.testing.assert_array_equal(no_prompt_mask['loss_mask'], [0, 1, 1, 1, 1, 0, 0])


def test_batched_equals_rowwise():
  rng = np.random.default_rng(0)
  tokens_BxL = rng.integers(0, 4, size=(5, 17))  # EOS=1 appears often, also at t=0
  valid_BxL = rng.random((5, 17)) < 0.9
  batched = packing.pack_row_fields(tokens_BxL, EOS, context_length=2, valid=valid_BxL)
  for b in range(5):
    row = packing.pack_row_fields(tokens_BxL[b], EOS, context_length=2, valid=valid_BxL[b])
    for key in packing.FIELDS:
      np.testing.assert_array_equal(batched[key][b], row[key])
  assert (batched['loss_mask'][:, 0] == 0).all()


def test_valid_shape_mismatch_raises():
  with pytest.raises(ValueError, match='valid'):
    packing.pack_row_fields(np.zeros(4), EOS, 1, valid=np.ones(3, bool))
