"""Countdown (Stream-of-Search generator, Gandhi et al. 2024; spec TASKS.md section 2) as a data source
for `nextlat_jax.data.pipeline`.

Targets 10..100 are shuffled with `random.Random(data_seed)` and the first 10% held out. Problem j of a
split draws (numpy, seeded by (data_seed, split, j)) a target, then batches of four inputs uniform in
1..99, and keeps the first draw for which the original depth-first search (pairs in
itertools.combinations order; operations a+b, a*b, larger-smaller, larger/smaller when exact; the
result appended after the remaining numbers) reaches the target using all numbers; the label is the
first solution that search finds. The search is vectorised over many draws at once: a leaf of the
search tree is (pair1, op1, pair2, op2, op3) and the first solution is the lowest valid leaf in that
order, which is exactly the DFS order (`reference_search` is the plain recursive search, for tests).

Inputs are sorted ascending before the search (data.sort_inputs; the paper's example lists them
ascending, the spec is silent). Row (31 tokens): n1 n2 n3 n4 T, eight `|` pause tokens, three
equations `a op b = c` joined by `,`, EOS. Integers are their own ids; `|`=10000, `*`=10001,
`/`=10002, `+`=10003, `-`=10004, `=`=10005, `,`=10006, EOS=10007, V = 10,008. The 13 prompt tokens are
not targets (context_length 12); the 17 answer tokens and EOS are.

Splits: n_train training problems on seen targets; the `eval` split holds n_test problems whose
targets follow data.test_targets: "mixed" (odd rows held-out targets, even rows seen targets; our
choice, the paper does not say), "heldout" or "seen". Problems on seen targets may rarely repeat a
training problem (about 0.2%; not filtered). Train row i is problem perm_e(i mod n_train), e = i //
n_train, perm_e seeded by (seed, e); the problem set itself depends only on data_seed.
"""
from __future__ import annotations

import functools
import itertools
import operator
import random

import ml_collections
import numpy as np

from nextlat_jax.data import packing
from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo, need
from nextlat_jax.data.tasks.path_star import epoch_permutation

BAR, MUL, DIV, ADD, SUB, EQUALS, COMMA, EOS = range(10000, 10008)
VOCAB_SIZE = 10008
OPS = {"+": ADD, "*": MUL, "-": SUB, "/": DIV}
OP_NAMES = {v: k for k, v in OPS.items()}
NUM_INPUTS, NUM_PAUSE, NUM_EQUATIONS = 4, 8, 3
PROMPT_LEN = NUM_INPUTS + 1 + NUM_PAUSE  # 13
ANSWER_LEN = 5 * NUM_EQUATIONS + NUM_EQUATIONS - 1  # 17
ROW_LEN = PROMPT_LEN + ANSWER_LEN + 1  # 31
CONTEXT_LENGTH = PROMPT_LEN - 1  # 12
TEST_TARGETS = ("mixed", "heldout", "seen")
_DRAWS = 16  # candidate input draws per problem per round of the vectorised search
_CHUNK = 512  # problems generated (and cached) together
_SPLIT_CODE = {"train": 0, "eval": 1}


def default_data_config() -> ml_collections.ConfigDict:
  """The paper's data: 500k training problems, 10k test problems, targets 10..100 (10% held out)."""
  return ml_collections.ConfigDict(dict(
      name="countdown",
      min_target=10, max_target=100,
      max_input=99,  # inputs uniform in 1..max_input
      heldout_fraction=0.1,  # of the targets, for out-of-distribution evaluation
      data_seed=444,  # the authors' generator seed; the problem set depends only on it
      sort_inputs=True,  # not specified; the paper's example lists the inputs ascending
      n_train=500_000, n_test=10_000,
      test_targets="mixed",  # not specified: "mixed" | "heldout" | "seen"
      seq_len=ROW_LEN - 1,
      num_rows=1 << 30,  # nominal train length (epochs over the n_train problems)
  ))


@functools.lru_cache(maxsize=16)
def target_split(data_seed: int, min_target: int, max_target: int, heldout_fraction: float
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(seen targets, held-out targets): shuffle min..max, hold out the first fraction."""
  targets = list(range(min_target, max_target + 1))
  random.Random(data_seed).shuffle(targets)
  k = int(len(targets) * heldout_fraction)
  return tuple(targets[k:]), tuple(targets[:k])


def combine(a: int, b: int) -> list[tuple[int, int, str, int]]:
  """The original generator's operations on a pair, in its order: (result, left, op, right)."""
  lo, hi = min(a, b), max(a, b)
  out = [(a + b, a, "+", b), (a * b, a, "*", b), (hi - lo, hi, "-", lo)]
  if lo != 0 and hi % lo == 0:
    out.append((hi // lo, hi, "/", lo))
  return out


def reference_search(target: int, nums: list[int], ops: tuple[str, ...] = ()) -> list[str] | None:
  """The original recursive DFS: the first solution (equation texts) reaching target, or None."""
  if len(nums) == 1:
    return list(ops) if nums[0] == target else None
  for i, j in itertools.combinations(range(len(nums)), 2):
    rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
    for result, a, op, b in combine(nums[i], nums[j]):
      found = reference_search(target, rest + [result], ops + (f"{a}{op}{b}={result}",))
      if found is not None:
        return found
  return None


def _expand(x_NxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """All children in DFS order, 4 op slots per pair: (child_NxCx(K-1), ok_NxC), C = 4 * #pairs."""
  K = x_NxK.shape[1]
  kids, oks = [], []
  for i, j in itertools.combinations(range(K), 2):
    a, b = x_NxK[:, i], x_NxK[:, j]
    rest = x_NxK[:, [k for k in range(K) if k not in (i, j)]]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    safe = np.maximum(lo, 1)
    true = np.ones_like(a, dtype=bool)
    for r, ok in ((a + b, true), (a * b, true), (hi - lo, true), (hi // safe, (lo != 0) & (hi % safe == 0))):
      kids.append(np.concatenate([rest, r[:, None]], axis=1))
      oks.append(ok)
  return np.stack(kids, axis=1), np.stack(oks, axis=1)


def first_solution_leaf(nums_Nx4: np.ndarray, target_N: np.ndarray) -> np.ndarray:
  """Index (DFS order, 6*4*3*4*4 = 1152 slots) of the first solution of each row, -1 if none."""
  N = len(nums_Nx4)
  x3, ok1 = _expand(np.asarray(nums_Nx4, np.int32))  # (N, 24, 3); values stay < 99^4 < 2^31
  x2, ok2 = _expand(x3.reshape(N * 24, 3))  # (N*24, 12, 2)
  a, b = x2[..., 0], x2[..., 1]
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  safe = np.maximum(lo, 1)
  t = np.repeat(np.asarray(target_N, np.int32), 24)[:, None]
  last = np.stack([a + b == t, a * b == t, hi - lo == t, (lo != 0) & (hi % safe == 0) & (hi // safe == t)],
                  axis=-1)  # (N*24, 12, 4): the final pair's four operations
  hit = (last & ok2[..., None]).reshape(N, 24, 12, 4) & ok1[:, :, None, None]
  hit = hit.reshape(N, -1)
  return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def solution_from_leaf(nums: list[int], leaf: int) -> list[tuple[int, str, int, int]]:
  """The equations (a, op, b, c) along search leaf `leaf` (see first_solution_leaf)."""
  choices = []
  for radix in (4, 4, 3, 4, 6):  # op3, op2, pair2, op1, pair1 (least significant first)
    leaf, r = divmod(leaf, radix)
    choices.append(r)
  pair1, op1, pair2, op2, op3 = choices[::-1]
  x, eqs = list(nums), []
  for pair, op in ((pair1, op1), (pair2, op2), (0, op3)):
    i, j = list(itertools.combinations(range(len(x)), 2))[pair]
    result, a, sym, b = combine(x[i], x[j])[op]
    eqs.append((a, sym, b, result))
    x = [x[k] for k in range(len(x)) if k not in (i, j)] + [result]
  return eqs


def row_tokens(nums: list[int], target: int, eqs: list[tuple[int, str, int, int]]) -> list[int]:
  """Token ids of `n1 n2 n3 n4 T | x8 a op b = c , ... EOS`."""
  out = [*nums, target] + [BAR] * NUM_PAUSE
  for k, (a, op, b, c) in enumerate(eqs):
    assert max(a, b, c) < 10000, f"solution number >= 10000 in {eqs}"
    out += ([COMMA] if k else []) + [a, OPS[op], b, EQUALS, c]
  return out + [EOS]


def raw_text(nums: list[int], target: int, eqs: list[tuple[int, str, int, int]]) -> str:
  """The paper's raw form `n1,n2,n3,n4,T|e1,e2,e3`."""
  return (",".join(str(v) for v in [*nums, target]) + "|"
          + ",".join(f"{a}{op}{b}={c}" for a, op, b, c in eqs))


@functools.lru_cache(maxsize=2048)
def _chunk(data_seed: int, split: str, chunk: int, pools: tuple[tuple[int, ...], ...], max_input: int,
           sort_inputs: bool) -> tuple[np.ndarray, np.ndarray]:
  """Rows (CHUNK, 31) int32 and targets (CHUNK,) of problems chunk*CHUNK .. +CHUNK - 1 of a split.

  Problem p draws its target from pools[p % len(pools)]."""
  n = _CHUNK
  rngs = [np.random.default_rng([data_seed, _SPLIT_CODE[split], chunk * n + j]) for j in range(n)]
  pool_of = [pools[(chunk * n + j) % len(pools)] for j in range(n)]
  target_N = np.asarray([pool[int(r.integers(len(pool)))] for r, pool in zip(rngs, pool_of)], np.int64)
  found: list[tuple[list[int], int] | None] = [None] * n
  todo = list(range(n))
  while todo:
    draws = np.stack([rngs[j].integers(1, max_input + 1, size=(_DRAWS, NUM_INPUTS)) for j in todo])
    if sort_inputs:
      draws = np.sort(draws, axis=-1)
    leaf = first_solution_leaf(draws.reshape(-1, NUM_INPUTS), np.repeat(target_N[todo], _DRAWS))
    leaf = leaf.reshape(len(todo), _DRAWS)
    left = []
    for row, j in enumerate(todo):
      hits = np.flatnonzero(leaf[row] >= 0)
      if hits.size:
        found[j] = (draws[row, hits[0]].tolist(), int(leaf[row, hits[0]]))
      else:
        left.append(j)
    todo = left
  rows = np.empty((n, ROW_LEN), np.int32)
  for j, (nums, leaf_j) in enumerate(found):
    eqs = solution_from_leaf(nums, leaf_j)
    assert eqs[-1][3] == target_N[j], (nums, int(target_N[j]), eqs)
    rows[j] = row_tokens(nums, int(target_N[j]), eqs)
  return rows, target_N.astype(np.int32)


def _check(data_cfg: ml_collections.ConfigDict) -> None:
  need(int(data_cfg.seq_len) == ROW_LEN - 1, "data.seq_len", data_cfg.seq_len,
       f"must be {ROW_LEN - 1} (rows of {ROW_LEN} tokens)")
  need(1 <= int(data_cfg.min_target) <= int(data_cfg.max_target) <= 9999, "data.max_target",
       data_cfg.max_target, f"need 1 <= min_target ({data_cfg.min_target}) <= max_target <= 9999")
  need(1 <= int(data_cfg.max_input) <= 99, "data.max_input", data_cfg.max_input,
       "must be in [1, 99] (keeps every solution number < 10000)")
  need(0.0 <= float(data_cfg.heldout_fraction) < 1.0, "data.heldout_fraction", data_cfg.heldout_fraction,
       "must be in [0, 1)")
  need(data_cfg.test_targets in TEST_TARGETS, "data.test_targets", data_cfg.test_targets,
       f"expected one of {TEST_TARGETS}")


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  _check(data_cfg)
  return DatasetInfo(vocab_size=VOCAB_SIZE, eos_id=EOS, pad_id=EOS, row_len=ROW_LEN)


class CountdownSource:
  """Rows of one split; a grain RandomAccessDataSource (pure function of (seed, split, index))."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, *, split: str, seed: int):
    seen, heldout = target_split(int(data_cfg.data_seed), int(data_cfg.min_target),
                                 int(data_cfg.max_target), float(data_cfg.heldout_fraction))
    self.seen, self.heldout = seen, heldout
    mix = data_cfg.test_targets
    if split == "train":
      self.pools = (seen,)
    else:
      self.pools = {"mixed": (seen, heldout), "heldout": (heldout,), "seen": (seen,)}[mix]
    need(all(self.pools), "data.heldout_fraction", data_cfg.heldout_fraction,
         f"leaves no targets for split {split!r} (test_targets={mix!r})")
    self.split, self.seed = split, int(seed)
    self.data_seed, self.max_input = int(data_cfg.data_seed), int(data_cfg.max_input)
    self.sort_inputs = bool(data_cfg.sort_inputs)
    self.n_problems = int(data_cfg.n_train if split == "train" else data_cfg.n_test)
    self.num_rows = int(data_cfg.num_rows) if split == "train" else self.n_problems

  def __len__(self) -> int:
    return self.num_rows

  def problem_index(self, index: int) -> int:
    if self.split == "eval":
      return index
    epoch, j = divmod(index, self.n_problems)
    return int(epoch_permutation(self.seed, epoch, self.n_problems)[j])

  def problem(self, index: int) -> tuple[np.ndarray, int]:
    """(row tokens (31,), target) of row `index`."""
    chunk, j = divmod(self.problem_index(index), _CHUNK)
    rows, targets = _chunk(self.data_seed, self.split, chunk, self.pools, self.max_input, self.sort_inputs)
    return rows[j], int(targets[j])

  def is_heldout(self, target: int) -> bool:
    return target in self.heldout

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} out of range for {self.num_rows} rows")
    return packing.pack_row_fields(self.problem(index)[0], EOS, CONTEXT_LENGTH)


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> CountdownSource:
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  _check(data_cfg)
  for key in ("n_train", "n_test", "num_rows"):
    need(int(data_cfg[key]) >= 1, f"data.{key}", data_cfg[key], "must be >= 1")
  need(seed >= 0, "seed", seed, "must be >= 0")
  return CountdownSource(data_cfg, split=split, seed=seed)
