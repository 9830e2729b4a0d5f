"""Manhattan taxi world-model task (TASKS.md §1): street graph, word tokenizer, random walks, rows.

A document is one random walk written as words, `origin destination d_1 .. d_m end`; `end` is the EOS.
Rows are packed walks (TASKS.md §1.5): each row starts at a walk's origin token, walks are concatenated
and the last one is cut off at the row length. Row i of a split is a pure function of (seed, split, i).

Choices where the spec is silent (all configurable):
- Walk length counts MOVES, uniform on {min_moves..max_moves}, default 3..97, so that a document has at
  most 100 tokens (origin + destination + moves + end).
- On reaching a sink node (no outgoing edge) the walk stops there; if it then has fewer than min_moves
  moves it is resampled from scratch (`resample_short=True`, default) or kept (`False`).
- Held-out (origin, destination) pairs: a splitmix64 hash of (split_seed, origin index, destination
  index) mapped to [0, 1) and compared with heldout_fraction. Node indices are positions in the
  graph's node list sorted as strings. The train split rejects walks whose (origin, final node) is held
  out; the eval split rejects every other walk. Rows are generated on the fly, each from its own RNG,
  so there is no shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from collections.abc import Iterable, Sequence

import numpy as np

from nextlat_jax.data import packing

DIRECTIONS = ('N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW')
DIRECTION_INDEX = {d: k for k, d in enumerate(DIRECTIONS)}
# (d_row, d_col) of each direction on a generated grid; the row index grows northward.
_GRID_OFFSETS = {
    'N': (1, 0), 'NE': (1, 1), 'E': (0, 1), 'SE': (-1, 1),
    'S': (-1, 0), 'SW': (-1, -1), 'W': (0, -1), 'NW': (1, -1),
}
PAD_WORD = '<pad>'
EOS_WORD = 'end'
SPLITS = {'train': 0, 'eval': 1}
CONTEXT_LENGTH = 1  # origin and destination are never targets (TASKS.md §1.5)
_MAX_ATTEMPTS = 100_000
_M64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True, eq=False)
class StreetGraph:
  """Directed street graph where (node, direction) -> next node is a function."""

  node_ids: tuple[str, ...]  # sorted as strings; a node's index is its position here
  next_node_NxK: np.ndarray  # int32 (n_nodes, 8): next node index per DIRECTIONS entry, -1 if none

  def __post_init__(self):
    if self.next_node_NxK.shape != (len(self.node_ids), len(DIRECTIONS)):
      raise ValueError(f'next_node_NxK has shape {self.next_node_NxK.shape}, expected '
                       f'({len(self.node_ids)}, {len(DIRECTIONS)})')

  @classmethod
  def from_edges(
      cls, edges: Iterable[tuple[str, str, str]], where: Sequence[str] | None = None
  ) -> StreetGraph:
    """Builds a graph from (source, direction, target) triples; `where` labels them for errors."""
    edges = list(edges)
    labels = list(where) if where is not None else [f'edge {i}' for i in range(len(edges))]
    seen: dict[tuple[str, str], str] = {}
    for (src, direction, tgt), label in zip(edges, labels):
      if direction not in DIRECTION_INDEX:
        raise ValueError(f'{label}: unknown direction {direction!r}; expected one of {DIRECTIONS}')
      for node in (src, tgt):
        reserved = node in (EOS_WORD, PAD_WORD, *DIRECTIONS)
        if not node or reserved or any(ch.isspace() for ch in node):
          raise ValueError(f'{label}: invalid node id {node!r}')
      if (src, direction) in seen:
        raise ValueError(f'{label}: duplicate edge for (node {src}, direction {direction}); first '
                         f'at {seen[src, direction]} (at most one edge per node and direction)')
      seen[src, direction] = label
    node_ids = tuple(sorted({n for src, _, tgt in edges for n in (src, tgt)}))
    index = {n: i for i, n in enumerate(node_ids)}
    next_node_NxK = np.full((len(node_ids), len(DIRECTIONS)), -1, dtype=np.int32)
    for src, direction, tgt in edges:
      next_node_NxK[index[src], DIRECTION_INDEX[direction]] = index[tgt]
    return cls(node_ids, next_node_NxK)

  @classmethod
  def from_tsv(cls, path: str | os.PathLike) -> StreetGraph:
    """Loads `source<TAB>direction<TAB>target` lines; `#` lines and blank lines are skipped."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f'street graph file not found: {path}')
    edges, where = [], []
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, start=1):
        line = line.strip()
        if not line or line.startswith('#'):
          continue
        fields = line.split('\t')
        if len(fields) != 3 or not all(fields):
          raise ValueError(
              f'{path}:{lineno}: expected source<TAB>direction<TAB>target, got {line!r}')
        edges.append(tuple(field.strip() for field in fields))
        where.append(f'{path}:{lineno}')
    if not edges:
      raise ValueError(f'{path}: no edges')
    return cls.from_edges(edges, where)

  @classmethod
  def grid(
      cls, rows: int, cols: int, seed: int = 0, two_way_fraction: float = 0.25,
      diagonal_fraction: float = 0.1,
  ) -> StreetGraph:
    """A generated one-way street grid: a small, strongly connected stand-in for Manhattan.

    Node (r, c) has id str(r * cols + c); r grows northward. Streets (rows) are one-way, E for even r
    and W for odd r; avenues (columns) are one-way, N for even c and S for odd c. The outer ring and a
    seeded random `two_way_fraction` of the interior streets and avenues are two-way. Each node gets,
    with probability `diagonal_fraction`, one extra edge in a random in-bounds diagonal direction
    (a "Broadway"). Strongly connected: every node reaches the ring along its street, and the ring
    reaches every node from its street's upstream end.
    """
    if rows < 2 or cols < 2:
      raise ValueError(f'grid needs rows >= 2 and cols >= 2, got rows={rows}, cols={cols}')
    rng = np.random.default_rng(seed)
    frac = two_way_fraction
    two_way_rows = {0, rows - 1} | {r for r in range(1, rows - 1) if rng.random() < frac}
    two_way_cols = {0, cols - 1} | {c for c in range(1, cols - 1) if rng.random() < frac}
    edges = set()

    def add(r, c, direction):
      dr, dc = _GRID_OFFSETS[direction]
      if 0 <= r + dr < rows and 0 <= c + dc < cols:
        edges.add((str(r * cols + c), direction, str((r + dr) * cols + c + dc)))

    for r in range(rows):
      for c in range(cols):
        if r in two_way_rows or r % 2 == 0:
          add(r, c, 'E')
        if r in two_way_rows or r % 2 == 1:
          add(r, c, 'W')
        if c in two_way_cols or c % 2 == 0:
          add(r, c, 'N')
        if c in two_way_cols or c % 2 == 1:
          add(r, c, 'S')
        if rng.random() < diagonal_fraction:
          add(r, c, ('NE', 'SE', 'SW', 'NW')[rng.integers(4)])
    return cls.from_edges(sorted(edges))

  @property
  def n_nodes(self) -> int:
    return len(self.node_ids)

  @property
  def n_edges(self) -> int:
    return int((self.next_node_NxK >= 0).sum())

  @property
  def out_degree(self) -> np.ndarray:
    """int32 (n_nodes,) number of outgoing edges per node."""
    return (self.next_node_NxK >= 0).sum(axis=1).astype(np.int32)

  @functools.cached_property
  def index(self) -> dict[str, int]:
    """Node id -> node index."""
    return {n: i for i, n in enumerate(self.node_ids)}

  @functools.cached_property
  def moves(self) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per node index, its (direction index, next node index) pairs in DIRECTIONS order."""
    return tuple(
        tuple((k, int(nxt)) for k, nxt in enumerate(row) if nxt >= 0) for row in self.next_node_NxK
    )

  def edges(self) -> list[tuple[str, str, str]]:
    """All (source, direction, target) triples, by source index then DIRECTIONS order."""
    src_E, dir_E = np.nonzero(self.next_node_NxK >= 0)
    return [(self.node_ids[s], DIRECTIONS[k], self.node_ids[self.next_node_NxK[s, k]])
            for s, k in zip(src_E, dir_E)]

  def to_tsv(self, path: str | os.PathLike) -> None:
    """Writes the graph in the edge-list format `from_tsv` reads."""
    with open(path, 'w', encoding='utf-8') as f:
      f.write('# source\tdirection\ttarget\n')
      f.writelines(f'{s}\t{d}\t{t}\n' for s, d, t in self.edges())


class WordTokenizer:
  """Word vocabulary (TASKS.md §1.2): pad=0, then end=1, W=2, SW=3, SE=4, S=5, NW=6, NE=7, N=8, E=9,
  then every node id, all in reverse lexicographic string order."""

  def __init__(self, node_ids: Sequence[str]):
    specials = sorted([EOS_WORD, *DIRECTIONS], reverse=True)
    self.words: tuple[str, ...] = (PAD_WORD, *specials, *sorted(node_ids, reverse=True))
    self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
    if len(self.ids) != len(self.words):
      raise ValueError('node ids must be unique and differ from pad, end and the directions')
    self.pad_id = self.ids[PAD_WORD]
    self.eos_id = self.ids[EOS_WORD]
    self.direction_ids = np.array([self.ids[d] for d in DIRECTIONS], dtype=np.int32)

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  def node_token_ids(self, node_ids: Sequence[str]) -> np.ndarray:
    """int32 token id of each node id (e.g. of StreetGraph.node_ids, indexed by node index)."""
    return np.array([self.ids[n] for n in node_ids], dtype=np.int32)

  def encode(self, words: str | Sequence[str]) -> np.ndarray:
    """int32 ids of whitespace-separated words (or a word list)."""
    if isinstance(words, str):
      words = words.split()
    try:
      return np.array([self.ids[w] for w in words], dtype=np.int32)
    except KeyError as e:
      raise ValueError(f'unknown word {e.args[0]!r}') from None

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Words of token ids."""
    return [self.words[int(i)] for i in ids]


def heldout_mask(
    origins: np.ndarray | int, destinations: np.ndarray | int, split_seed: int, fraction: float
) -> np.ndarray | bool:
  """Whether each (origin, destination) node-index pair is held out (bool; broadcast for arrays)."""
  if isinstance(origins, int) and isinstance(destinations, int):  # fast path used per walk
    h = _mix64(_mix64(_mix64(split_seed & _M64) ^ origins) ^ destinations)
    return (h >> 11) * 2.0**-53 < fraction
  o = np.asarray(origins, dtype=np.uint64)
  d = np.asarray(destinations, dtype=np.uint64)
  with np.errstate(over='ignore'):
    h = _mix64(_mix64(_mix64(np.asarray(split_seed, dtype=np.uint64)) ^ o) ^ d)
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _mix64(x):
  """splitmix64 finaliser on uint64 arrays or Python ints (arithmetic mod 2**64)."""
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def random_walk(
    graph: StreetGraph, rng: np.random.Generator, min_moves: int = 3, max_moves: int = 97,
    resample_short: bool = True,
) -> tuple[list[int], list[int]]:
  """One walk as (node indices, m + 1 of them; direction indices, m of them).

  Uniform start node, m ~ U{min_moves..max_moves} moves, each a uniform valid direction; the walk stops
  early at a sink and is then resampled if it has fewer than min_moves moves and resample_short is set.
  """
  moves = graph.moves
  for _ in range(_MAX_ATTEMPTS):
    node = int(rng.integers(graph.n_nodes))
    u = rng.random(int(rng.integers(min_moves, max_moves + 1)))
    nodes, dirs = [node], []
    for u_k in u:
      options = moves[node]
      if not options:
        break
      direction, node = options[int(u_k * len(options))]
      nodes.append(node)
      dirs.append(direction)
    if len(dirs) >= min_moves or not resample_short:
      return nodes, dirs
  raise RuntimeError(f'no walk with >= {min_moves} moves after {_MAX_ATTEMPTS} attempts')


class WalkRowSource:
  """Packed rows of random walks for one split; a grain RandomAccessDataSource.

  `source[i]` is a dict of the four packing.FIELDS, int32 arrays of shape (row_len,), a pure
  function of (seed, split, i). Its length `num_rows` is nominal: any index >= 0 would work.
  """

  def __init__(
      self, graph: StreetGraph, *, row_len: int, num_rows: int, seed: int, split: str = 'train',
      context_length: int | None = CONTEXT_LENGTH, min_moves: int = 3, max_moves: int = 97,
      resample_short: bool = True, heldout_fraction: float = 0.1, split_seed: int = 0,
  ):
    if split not in SPLITS:
      raise ValueError(f'split={split!r}: expected one of {sorted(SPLITS)}')
    if not 1 <= min_moves <= max_moves:
      raise ValueError(f'need 1 <= min_moves <= max_moves, got min_moves={min_moves}, '
                       f'max_moves={max_moves}')
    if not 0.0 <= heldout_fraction < 1.0 or (split == 'eval' and heldout_fraction == 0.0):
      raise ValueError(f'heldout_fraction={heldout_fraction}: need 0 <= f < 1 (and f > 0 for eval)')
    if row_len < 2 or num_rows < 0 or seed < 0 or split_seed < 0:
      raise ValueError(f'need row_len >= 2, num_rows >= 0, seed >= 0, split_seed >= 0; got row_len='
                       f'{row_len}, num_rows={num_rows}, seed={seed}, split_seed={split_seed}')
    self.graph = graph
    self.tokenizer = WordTokenizer(graph.node_ids)
    self.row_len, self.num_rows, self.seed, self.split = row_len, num_rows, seed, split
    self.context_length = context_length
    self.min_moves, self.max_moves, self.resample_short = min_moves, max_moves, resample_short
    self.heldout_fraction, self.split_seed = heldout_fraction, split_seed
    self._node_tokens = self.tokenizer.node_token_ids(graph.node_ids).tolist()
    self._direction_tokens = self.tokenizer.direction_ids.tolist()

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_rows:
      raise IndexError(f'row {index} out of range for {self.num_rows} rows')
    return packing.pack_row_fields(self.row_tokens(index), self.tokenizer.eos_id,
                                   self.context_length)

  def is_heldout(self, origin: int, destination: int) -> bool:
    """Whether the (origin, destination) node-index pair belongs to the eval split."""
    return bool(heldout_mask(int(origin), int(destination), self.split_seed,
                             self.heldout_fraction))

  def sample_walk(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A random walk whose (origin, final node) pair belongs to this source's split."""
    want_heldout = self.split == 'eval'
    for _ in range(_MAX_ATTEMPTS):
      nodes, dirs = random_walk(self.graph, rng, self.min_moves, self.max_moves,
                                self.resample_short)
      if self.is_heldout(nodes[0], nodes[-1]) == want_heldout:
        return nodes, dirs
    raise RuntimeError(f'no {self.split} walk after {_MAX_ATTEMPTS} attempts '
                       f'(heldout_fraction={self.heldout_fraction})')

  def walk_tokens(self, nodes: Sequence[int], dirs: Sequence[int]) -> list[int]:
    """Token ids of `origin destination d_1 .. d_m end`."""
    return [self._node_tokens[nodes[0]], self._node_tokens[nodes[-1]],
            *(self._direction_tokens[k] for k in dirs), self.tokenizer.eos_id]

  def row_tokens(self, index: int) -> np.ndarray:
    """int32 (row_len,): walks of row `index` concatenated, the last one cut off."""
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    tokens: list[int] = []
    while len(tokens) < self.row_len:
      tokens.extend(self.walk_tokens(*self.sample_walk(rng)))
    return np.asarray(tokens[: self.row_len], dtype=np.int32)
