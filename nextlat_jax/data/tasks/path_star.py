"""Path-Star graphs G_{d,l} (Bachmann & Nagarajan 2024; spec TASKS.md section 3) as a data source for
`nextlat_jax.data.pipeline`.

Graph g (g = 0 .. n_train + n_test - 1) is generated with Python's `random.Random(g)` (the reference's
`random.seed(i)`; the test set continues the counter): shuffle range(N), pop the source, pop l - 1
nodes per arm chained outward (arm 0 holds the goal), shuffle the edge list. Graphs 0 .. n_train - 1
are the fixed training set, the next n_test the held-out test set (the `eval` split); neither depends
on the training seed.

Row (3E + l + 4 tokens, E = d(l - 1)): `u v | u v | ... | u v / source goal = p_1 .. p_l EOS`; node k
is token k, `|`=100, `=`=101, `/`=102, `$`=103 (pad, unused), EOS=104, V = 106 (105 padded). Loss only
on the answer (the l path tokens and EOS): context_length = 3E + 2.

Train row i is graph perm_e(i mod n_train) with e = i // n_train and perm_e a permutation seeded by
(seed, e): every epoch visits each training graph once, in an order set by the training seed (the
reshuffle per epoch is our choice; the spec is silent). Eval row i is test graph n_train + i.
"""
from __future__ import annotations

import functools
import operator
import random

import ml_collections
import numpy as np

from nextlat_jax.data import packing
from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo, need

BAR, EQUALS, SLASH, PAD, EOS = 100, 101, 102, 103, 104
VOCAB_SIZE = 106  # 105 ids, padded to 106 as the reference
NUM_NODE_LABELS = 100  # node tokens are 0..99


def default_data_config(degree: int = 5, path_len: int = 5) -> ml_collections.ConfigDict:
  """Paper data for G_{degree, path_len}: 200k fixed training graphs, 20k test graphs, N = 100."""
  return ml_collections.ConfigDict(dict(
      name="path_star",
      degree=degree,  # d: arms leaving the source
      path_len=path_len,  # l: nodes on the answer path, source and goal included
      num_nodes=100,  # N: labels are drawn from 0..N-1 (reference --max_nodes 100)
      n_train=200_000,
      n_test=20_000,
      seq_len=row_len(degree, path_len) - 1,
      num_rows=1 << 30,  # nominal train length (epochs over the n_train graphs)
  ))


def num_edges(degree: int, path_len: int) -> int:
  return degree * (path_len - 1)


def prompt_len(degree: int, path_len: int) -> int:
  """Tokens through `=`: 3E + 3."""
  return 3 * num_edges(degree, path_len) + 3


def row_len(degree: int, path_len: int) -> int:
  """3E + l + 4 (prompt, path, EOS)."""
  return prompt_len(degree, path_len) + path_len + 1


def context_length(degree: int, path_len: int) -> int:
  """Prompt length - 1 = 3E + 2: every prompt token is a non-target."""
  return prompt_len(degree, path_len) - 1


def generate(index: int, degree: int, path_len: int, num_nodes: int
             ) -> tuple[list[tuple[int, int]], list[int]]:
  """Graph `index`: (shuffled edge list, answer path source..goal)."""
  rnd = random.Random(index)
  nodes = list(range(num_nodes))
  rnd.shuffle(nodes)
  source = nodes.pop()
  edges, path = [], [source]
  for arm in range(degree):
    old = source
    for _ in range(path_len - 1):
      new = nodes.pop()
      edges.append((old, new))
      old = new
      if arm == 0:
        path.append(new)
  rnd.shuffle(edges)
  return edges, path


def text(edges: list[tuple[int, int]], path: list[int]) -> str:
  """The reference text form `u,v|u,v|...|u,v/source,goal=p1,p2,...,pl`."""
  graph = "|".join(f"{u},{v}" for u, v in edges)
  return f"{graph}/{path[0]},{path[-1]}=" + ",".join(str(p) for p in path)


def tokens(edges: list[tuple[int, int]], path: list[int]) -> list[int]:
  """Token ids of the full row (commas dropped, EOS appended)."""
  out: list[int] = []
  for k, (u, v) in enumerate(edges):
    if k:
      out.append(BAR)
    out += [u, v]
  return out + [SLASH, path[0], path[-1], EQUALS, *path, EOS]


def _check(data_cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  d, l, n = int(data_cfg.degree), int(data_cfg.path_len), int(data_cfg.num_nodes)
  need(d >= 1, "data.degree", data_cfg.degree, "must be >= 1")
  need(l >= 2, "data.path_len", data_cfg.path_len, "must be >= 2")
  need(1 + d * (l - 1) <= n <= NUM_NODE_LABELS, "data.num_nodes", data_cfg.num_nodes,
       f"must be in [1 + degree*(path_len-1), {NUM_NODE_LABELS}] = [{1 + d * (l - 1)}, {NUM_NODE_LABELS}]")
  need(int(data_cfg.seq_len) == row_len(d, l) - 1, "data.seq_len", data_cfg.seq_len,
       f"must be 3E + path_len + 3 = {row_len(d, l) - 1} for G_{{{d},{l}}}")
  return d, l, n


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  d, l, _ = _check(data_cfg)
  return DatasetInfo(vocab_size=VOCAB_SIZE, eos_id=EOS, pad_id=PAD, row_len=row_len(d, l))


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The visiting order of n items in one epoch, seeded by (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0x5A7]).permutation(n)


class PathStarSource:
  """Rows of one split; a grain RandomAccessDataSource (pure function of (seed, split, index))."""

  def __init__(self, degree: int, path_len: int, num_nodes: int, *, n_train: int, n_test: int,
               split: str, seed: int, num_rows: int):
    self.degree, self.path_len, self.num_nodes = degree, path_len, num_nodes
    self.n_train, self.n_test, self.split, self.seed = n_train, n_test, split, seed
    self.num_rows = num_rows if split == "train" else n_test
    self.context_length = context_length(degree, path_len)
    self.prompt_len = prompt_len(degree, path_len)

  def __len__(self) -> int:
    return self.num_rows

  def graph_index(self, index: int) -> int:
    """The generator counter of row `index`."""
    if self.split == "eval":
      return self.n_train + index
    epoch, j = divmod(index, self.n_train)
    return int(epoch_permutation(self.seed, epoch, self.n_train)[j])

  def example(self, index: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(edges, path) of row `index`."""
    return generate(self.graph_index(index), self.degree, self.path_len, self.num_nodes)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} out of range for {self.num_rows} rows")
    row = np.asarray(tokens(*self.example(index)), np.int32)
    return packing.pack_row_fields(row, EOS, self.context_length)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> PathStarSource:
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  d, l, n = _check(data_cfg)
  for key in ("n_train", "n_test", "num_rows"):
    need(int(data_cfg[key]) >= 1, f"data.{key}", data_cfg[key], "must be >= 1")
  need(seed >= 0, "seed", seed, "must be >= 0")
  return PathStarSource(d, l, n, n_train=int(data_cfg.n_train), n_test=int(data_cfg.n_test), split=split,
                        seed=int(seed), num_rows=int(data_cfg.num_rows))
