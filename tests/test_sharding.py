"""Sharded training (data / FSDP / tensor parallel) computes the same gradients as one device.

For every objective (gpt, nextlat d = 1 and 2, mtp, mtp_deepseek, jtp, bst) and every dynamics kind,
jit(grad(loss)) with the Setup's param and batch shardings on a mesh of the 8 fake CPU devices (conftest)
matches the same gradient on one device to 1e-5 of each tensor's max |g| (float32 reduction-order noise
is ~5e-7). The cases together cover the meshes (8,1,1), (1,8,1), (2,2,2), (2,4,1), (1,4,2), (4,1,2), 1-4 rows per
batch shard and rows of 9-17 tokens, the vocabulary-wide losses in chunks of 4 positions with the head and
logits sharded over `tensor` (including (1,1,8) and (2,1,4)), with (2, 2, 2) at 1-4 rows of 9-13 tokens, where XLA miscompiled
the (data, fsdp) batch order (docs/sharding.md). A separate test checks that params and batch really are
split on (2, 2, 2).
"""

import functools
import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nextlat_jax.config import validate
from nextlat_jax.parallel import canary
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import step as step_lib

from tests.tiny import contract_fields, random_rows, tiny_config

EOS, PAD, V, D = 1, 0, 16, 32
TOL = 1e-5  # relative to each gradient tensor's max |g|
VARIANTS = {  # name -> (objective, horizon, dynamics kind)
    "gpt": ("gpt", 1, "mlp"), "nextlat_d1": ("nextlat", 1, "mlp"), "nextlat_d2": ("nextlat", 2, "mlp"),
    "mtp": ("mtp", 2, "mlp"), "mtp_deepseek": ("mtp_deepseek", 2, "mlp"), "jtp": ("jtp", 2, "mlp"),
    "bst": ("bst", 1, "mlp"), "resmlp": ("nextlat", 2, "resmlp"), "gru": ("nextlat", 2, "gru"),
    "attn": ("nextlat", 2, "attn"),
    "gpt_8heads": ("gpt", 1, "mlp"),  # n_head 8, for tensor = 8
}
# (variant, global batch, row length, meshes): rows per shard = batch / (data * fsdp). One compile pair
# per case costs ~10 s of CPU, so each variant gets one layout and together they cover every mesh, 1-4
# rows per shard and rows of 9-17 tokens; the full sweep is in docs/sharding.md.
CASES = [
    ("gpt", 8, 9, ((8, 1, 1),)),
    ("nextlat_d1", 12, 11, ((2, 2, 2),)),
    ("nextlat_d2", 8, 13, ((2, 2, 2),)),
    ("mtp", 8, 12, ((2, 2, 2),)),
    ("mtp_deepseek", 12, 9, ((1, 4, 2),)),
    ("jtp", 8, 17, ((4, 1, 2),)),
    ("bst", 16, 9, ((2, 2, 2),)),
    ("resmlp", 8, 12, ((2, 4, 1),)),
    ("gru", 8, 10, ((1, 8, 1),)),
    ("attn", 12, 9, ((2, 2, 2),)),
    ("nextlat_d2", 4, 10, ((2, 2, 2),)),  # 1 row per shard: once refused by config.validate
    # Vocab-parallel head and logits (V / tensor = 2 or 4 entries per shard) through the chunked losses.
    ("gpt_8heads", 8, 11, ((1, 1, 8),)),
    ("nextlat_d2", 8, 12, ((2, 1, 4),)),
]
VOCAB_CHUNK = 4  # positions per chunk of the vocabulary-wide losses: 3-5 chunks per row, the last padded


def make_config(variant: str, shape: tuple[int, int, int], batch: int):
  objective, horizon, kind = VARIANTS[variant]
  c = tiny_config(shape, vocab=V, d_model=D, batch=batch, eos=EOS)
  c.objective.update(name=objective, horizon=horizon, vocab_chunk=VOCAB_CHUNK)
  c.dynamics.kind = kind
  if variant.endswith("_8heads"):
    c.model.n_head = 8
  return c


def host_batch(B: int, L: int, seed: int = 0) -> dict:
  """Packed rows (METHOD §2) with EOS crossings, context_length-1 prompt masks and tail padding."""
  rng = np.random.default_rng(seed)
  tokens = random_rows(rng, B, L, V, EOS, 0.15)
  valid = np.ones((B, L), bool)
  for b, n_pad in enumerate(rng.integers(0, 4, size=B)):
    valid[b, L - n_pad:] = False
  return contract_fields(tokens, valid, EOS, PAD)


@functools.lru_cache(maxsize=None)
def reference(variant: str, B: int, L: int):
  """Single-device gradients and the params they are taken at (cached: shared by the meshes of a case)."""
  return canary.gradients(make_config(variant, (1, 1, 1), B), canary.single_device_mesh(), host_batch(B, L))


@pytest.mark.parametrize("variant,B,L,meshes", CASES, ids=[f"{v}-B{b}-L{l}" for v, b, l, _ in CASES])
def test_sharded_gradients_match_one_device(variant, B, L, meshes):
  ref, params = reference(variant, B, L)
  # The comparison is not vacuous: every tensor gets a gradient.
  assert all(np.max(np.abs(g)) > 0 for g in jax.tree.leaves(ref)), variant
  for shape in meshes:
    c = make_config(variant, shape, B)
    validate(c, num_devices=math.prod(shape))
    mesh = make_mesh(c.mesh, devices=jax.devices()[:math.prod(shape)])
    errors = canary.relative_errors(canary.gradients(c, mesh, host_batch(B, L), params=params)[0], ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{variant} mesh {shape}, {B // (shape[0] * shape[1])} rows/shard, L={L}: " \
                                f"{worst} rel. error {errors[worst]:.3g}"


def shard_shapes(abstract) -> set:
  return {abstract.sharding.shard_shape(abstract.shape)}


@pytest.mark.parametrize("objective", ["nextlat", "gpt"])
def test_params_and_batch_are_sharded(objective):
  B, L = 8, 17
  c = make_config("nextlat_d2" if objective == "nextlat" else "gpt", (2, 2, 2), B)
  mesh = make_mesh(c.mesh, devices=jax.devices()[:8])
  setup = step_lib.build(c, mesh)
  params = setup.abstract_state.params
  trunk = params["trunk"]
  qkv = trunk["blocks"]["qkv"]["kernel"]  # (layers, D, 3, heads, head_dim)
  assert qkv.shape == (2, D, 3, 4, 8)
  spec = tuple(qkv.sharding.spec)
  assert spec[1] == "fsdp" and spec[3] == "tensor", spec
  assert shard_shapes(qkv) == {(2, D // 2, 3, 2, 8)}
  assert shard_shapes(trunk["embed"]) == {(V // 2, D // 2)}  # (vocab, embed) -> (tensor, fsdp)
  assert shard_shapes(trunk["head"]) == {(D // 2, V // 2)}
  assert shard_shapes(trunk["blocks"]["mlp_in"]["kernel"]) == {(2, D // 2, 2, 32)}
  if objective == "nextlat":
    assert shard_shapes(params["dynamics"]["fc1"]["kernel"]) == {(2 * D // 2, 24)}
  # Adam moments shard like their parameters.
  mu = [x for x in jax.tree.leaves(setup.abstract_state.opt_state) if getattr(x, "shape", None) == qkv.shape]
  assert len(mu) == 2 and all(x.sharding.is_equivalent_to(qkv.sharding, qkv.ndim) for x in mu)

  # The batch: rows split over fsdp x data (fsdp-major, docs/sharding.md; 4 groups of 2 rows),
  # replicated over tensor.
  batch = step_lib.global_batch(host_batch(B, L), setup.batch_sharding)
  tokens = batch["tokens"]
  assert tokens.sharding.spec == P(("fsdp", "data"), None)
  assert {tuple(s.data.shape) for s in tokens.addressable_shards} == {(B // 4, L)}
  assert len({s.index[0].indices(B) for s in tokens.addressable_shards}) == 4
  for key in step_lib.BATCH_KEYS:
    assert batch[key].sharding == tokens.sharding


def test_the_step_updates_the_state_in_place():
  """The step donates the train state: every state leaf's buffer is aliased to its updated output (one
  train-state copy, not two). The batch is not donated: no output has a batch field's shape, so XLA
  could reuse none of its buffers (jax would only warn "Some donated buffers were not usable")."""
  B, L = 8, 17
  c = make_config("gpt", (2, 2, 2), B)
  setup = step_lib.build(c, make_mesh(c.mesh, devices=jax.devices()[:8]))
  lowered = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L), setup.abstract_rng())
  state_info, batch_info, _ = lowered.args_info[0]
  assert all(a.donated for a in jax.tree.leaves(state_info)) and not any(a.donated for a in jax.tree.leaves(batch_info))
  header = lowered.compile().as_text().splitlines()[0]
  aliased = {int(p) for p in re.findall(r"\((\d+), \{\}, (?:may|must)-alias\)", header)}
  assert aliased == set(range(len(jax.tree.leaves(setup.abstract_state)))), header[:500]
