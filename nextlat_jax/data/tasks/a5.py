"""The A5 word problem (Merrill, Petty & Sabharwal 2024; spec TASKS.md section 4) as a data source for
`nextlat_jax.data.pipeline`.

Group: the 60 even permutations of (0..4) in lexicographic order, so element 0 is the identity; a
permutation p is the tuple of images (p[i] = image of i) and the product is composition,
(p . q)[i] = p[q[i]] (apply q first). A word g_1 .. g_k has running-product labels
acc_t = acc_{t-1} . g_t with acc_0 = identity (left to right), tagged at every position.

Ids: the model vocabulary is 61: ids 0..59 are the elements, read as inputs through the embedding E
and as states through the output head (E and the head are untied, so these are in effect separate
60-token input and label vocabularies, as in the paper's parameter count); id 60 is EOS/pad and never
occurs in a word. (The paper's E and head have 60 rows; the extra id adds 2 x 512 parameters.)

Row (seq_len + 1 = k + 1 columns): tokens = [g_1 .. g_k, PAD] with the PAD column marked as padding
(segment_ids -1); labels = [PAD, acc_1 .. acc_k]; loss_mask = [0, 1 .. 1]. Column t's CE target is
labels[t] (not tokens[t]): the state h_{t-1}, which has read g_1 .. g_t, predicts acc_t, and the
latent dynamics consume the next input, h_t = p_psi(h_{t-1}, E(g_{t+1})). Objectives must read
`labels` where present (see the module docstring of nextlat_jax.eval.metrics.a5 and the issue 5
report); loss_mask marks the trained label columns, including the last one, whose input is padding.

Words: word w of a pool is uniform in 60^k, drawn by numpy seeded by (data_seed, pool, w); pool 0
holds n_words length-k words (train = the first train_fraction of them, the `eval` split = the rest,
as Merrill et al.'s default 80/20 split), pool 1 the length-test_len test words of the metric.
Words are unique with probability > 1 - 1e-9 (60^12 = 2.2e21; birthday bound), not by construction.
Train row i is word perm_e(i mod n_train) with e = i // n_train, perm_e seeded by (seed, e).
"""
from __future__ import annotations

import itertools
import operator

import ml_collections
import numpy as np

from nextlat_jax.data.dataset_info import SPLITS, DatasetInfo, need
from nextlat_jax.data.tasks.path_star import epoch_permutation

NUM_ELEMENTS = 60
PAD = EOS = 60
VOCAB_SIZE = 61
_TRAIN_POOL, _TEST_POOL = 0, 1


def default_data_config() -> ml_collections.ConfigDict:
  """The paper's data: 1M length-12 words (80% train), 100k length-36 test words."""
  return ml_collections.ConfigDict(dict(
      name="a5",
      train_len=12,  # k: word length of the train and eval splits
      test_len=36,  # length of the metric's test words
      n_words=1_000_000,
      train_fraction=0.8,  # [derived]: 400k steps = 512 epochs of ~800k words
      n_test=100_000,
      data_seed=0,  # not specified; the word sets depend only on it
      seq_len=12,  # = train_len
      num_rows=1 << 30,  # nominal train length (epochs over the training words)
  ))


def _parity(p: tuple[int, ...]) -> int:
  return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2


ELEMENTS: tuple[tuple[int, ...], ...] = tuple(p for p in itertools.permutations(range(5)) if _parity(p) == 0)
INDEX = {p: i for i, p in enumerate(ELEMENTS)}
assert len(ELEMENTS) == NUM_ELEMENTS and ELEMENTS[0] == (0, 1, 2, 3, 4)


def compose(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
  """(p . q)[i] = p[q[i]]."""
  return tuple(p[q[i]] for i in range(len(q)))


MUL = np.asarray([[INDEX[compose(p, q)] for q in ELEMENTS] for p in ELEMENTS], np.int32)  # MUL[a, b] = a . b


def running_product(words_NxL: np.ndarray) -> np.ndarray:
  """acc_t = acc_{t-1} . g_t, acc_0 = identity (index 0): (N, L) int32."""
  words_NxL = np.asarray(words_NxL)
  acc_N = np.zeros(words_NxL.shape[0], np.int32)
  out = np.empty(words_NxL.shape, np.int32)
  for t in range(words_NxL.shape[1]):
    acc_N = MUL[acc_N, words_NxL[:, t]]
    out[:, t] = acc_N
  return out


def word(data_seed: int, pool: int, index: int, length: int) -> np.ndarray:
  """Word `index` of a pool, (length,) int32 element ids."""
  return np.random.default_rng([data_seed, pool, index]).integers(0, NUM_ELEMENTS, size=length).astype(np.int32)


def row_fields(word_L: np.ndarray) -> dict[str, np.ndarray]:
  """The batch fields (+ labels) of one word: columns k + 1 (see the module docstring)."""
  k = len(word_L)
  tokens = np.concatenate([word_L, [PAD]]).astype(np.int32)
  labels = np.concatenate([[PAD], running_product(word_L[None])[0]]).astype(np.int32)
  valid = np.arange(k + 1) < k
  return {
      "tokens": tokens,
      "segment_ids": np.where(valid, 0, -1).astype(np.int32),
      "positions": np.where(valid, np.arange(k + 1) + 1, 0).astype(np.int32),
      "loss_mask": (np.arange(k + 1) >= 1).astype(np.int32),
      "labels": labels,
  }


def test_words(data_cfg: ml_collections.ConfigDict, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first n test words of length test_len and their labels: two (n, test_len) int32 arrays."""
  _check(data_cfg)
  need(1 <= n <= int(data_cfg.n_test), "num_examples", n, f"must be in [1, data.n_test={data_cfg.n_test}]")
  words = np.stack([word(int(data_cfg.data_seed), _TEST_POOL, i, int(data_cfg.test_len)) for i in range(n)])
  return words, running_product(words)


def _check(data_cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  k = int(data_cfg.train_len)
  need(k >= 1, "data.train_len", data_cfg.train_len, "must be >= 1")
  need(int(data_cfg.test_len) >= 1, "data.test_len", data_cfg.test_len, "must be >= 1")
  need(int(data_cfg.seq_len) == k, "data.seq_len", data_cfg.seq_len, f"must equal data.train_len={k}")
  need(0.0 < float(data_cfg.train_fraction) < 1.0, "data.train_fraction", data_cfg.train_fraction,
       "must be in (0, 1)")
  n_train = int(int(data_cfg.n_words) * float(data_cfg.train_fraction))
  need(1 <= n_train < int(data_cfg.n_words), "data.n_words", data_cfg.n_words,
       f"leaves an empty train or eval split at train_fraction={data_cfg.train_fraction}")
  return k, n_train


def info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  k, _ = _check(data_cfg)
  extra = {"extra_fields": ("labels",)} if "extra_fields" in DatasetInfo.__dataclass_fields__ else {}
  return DatasetInfo(vocab_size=VOCAB_SIZE, eos_id=EOS, pad_id=PAD, row_len=k + 1, **extra)


class A5Source:
  """Rows of one split; a grain RandomAccessDataSource (pure function of (seed, split, index))."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, *, split: str, seed: int):
    self.length, self.n_train = _check(data_cfg)
    self.split, self.seed, self.data_seed = split, int(seed), int(data_cfg.data_seed)
    self.n_eval = int(data_cfg.n_words) - self.n_train
    self.num_rows = int(data_cfg.num_rows) if split == "train" else self.n_eval

  def __len__(self) -> int:
    return self.num_rows

  def word_index(self, index: int) -> int:
    """Index in pool 0 of row `index`."""
    if self.split == "eval":
      return self.n_train + index
    epoch, j = divmod(index, self.n_train)
    return int(epoch_permutation(self.seed, epoch, self.n_train)[j])

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not 0 <= index < self.num_rows:
      raise IndexError(f"row {index} out of range for {self.num_rows} rows")
    return row_fields(word(self.data_seed, _TRAIN_POOL, self.word_index(index), self.length))


def make_source(data_cfg: ml_collections.ConfigDict, *, split: str, seed: int) -> A5Source:
  need(split in SPLITS, "split", split, f"expected one of {SPLITS}")
  need(int(data_cfg.num_rows) >= 1, "data.num_rows", data_cfg.num_rows, "must be >= 1")
  need(seed >= 0, "seed", seed, "must be >= 0")
  return A5Source(data_cfg, split=split, seed=seed)
