"""The world under test of the street-grid / Manhattan world-model metrics (nextlat_jax.eval.metrics.
world_model): the metric settings, the model interface `LM`, the street graph as arrays (`World`), the
tracer of generated routes, the true world model (`OracleLM`) and host-side generation."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from nextlat_jax.data.tasks.manhattan import StreetGraph, WordTokenizer

COMPRESSION_MODES = ("reference", "vafa")
DETOUR_KINDS = ("random_valid", "least_likely", "second_most_likely")
_REDRAWS = 100_000
# The metric families `nextlat eval --metrics=NAME,...` chooses from (world_model_metrics' `families`).
FAMILIES = ("next_token", "valid_trajectories", "compression", "detours")


@dataclasses.dataclass(frozen=True)
class Settings:
  max_hops: int = 48  # evaluation pairs: shortest path <= 48 hops (reference); 50 as an option
  num_pairs: int = 6400  # valid trajectories: 50 x 128 pairs drawn with replacement (reference)
  max_new_tokens: int = 100  # valid trajectories: tokens generated after [origin, destination]
  next_token_walks: int = 1000  # not specified: held-out walks teacher-forced
  compression_trials: int = 100
  compression_suffixes: int = 30
  epsilon: float = 0.01
  compression_modes: tuple[str, ...] = COMPRESSION_MODES
  detour_trials: int = 100
  detour_prob: float = 0.75
  detour_kinds: tuple[str, ...] = ("random_valid",)  # the paper's; the others on request
  detour_success: str = "legal"  # the reference's detour script counts `legal`; both are reported
  batch_size: int = 256
  seed: int = 0


class LM(Protocol):
  """A next-token model on one document per row (row b starts at its origin token)."""

  vocab_size: int

  def start(self, prompt_BxP: np.ndarray, len_B: np.ndarray, max_new: int) -> tuple[Any, np.ndarray]:
    """Reads right-padded prompts (at most max_new tokens will follow); returns (state, float32
    log-probs (B, V) of the next token)."""

  def step(self, state: Any, tokens_B: np.ndarray) -> tuple[Any, np.ndarray]:
    """Appends one token per row; returns (state, log-probs (B, V) of the token after it)."""

  def teacher_force(self, tokens_BxT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax (B, T-1), log p(tokens[:, t+1] | tokens[:, :t+1]) (B, T-1)) for every column t."""


class World:
  """The graph as lookup tables for the metrics: token <-> node / direction, BFS hop distances,
  incoming edges, and the held-out evaluation pairs."""

  def __init__(self, graph: StreetGraph, tokenizer: WordTokenizer,
               heldout: Callable[[np.ndarray, np.ndarray], np.ndarray], max_hops: int = 48):
    if max_hops < 1:
      raise ValueError(f"max_hops={max_hops}: must be >= 1")
    self.graph, self.tokenizer, self.max_hops = graph, tokenizer, max_hops
    self.next_NxK = graph.next_node_NxK
    self.eos_id, self.pad_id, self.vocab_size = tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size
    n = graph.n_nodes
    self.node_tokens_N = tokenizer.node_token_ids(graph.node_ids)
    self.dir_tokens_K = tokenizer.direction_ids
    self.node_of_token_V = np.full(self.vocab_size, -1, np.int32)
    self.node_of_token_V[self.node_tokens_N] = np.arange(n, dtype=np.int32)
    self.dir_of_token_V = np.full(self.vocab_size, -1, np.int32)
    self.dir_of_token_V[self.dir_tokens_K] = np.arange(len(self.dir_tokens_K), dtype=np.int32)
    self.dist_NxN = hop_distances(self.next_NxK)
    src_E, dir_E = np.nonzero(self.next_NxK >= 0)
    dst_E = self.next_NxK[src_E, dir_E]
    order = np.argsort(dst_E, kind="stable")
    self.in_src_E, self.in_dir_E = src_E[order].astype(np.int32), dir_E[order].astype(np.int32)
    self.in_ptr = np.searchsorted(dst_E[order], np.arange(n + 1)).astype(np.int64)
    self.pairs_Px2 = self._eval_pairs(heldout)

  def _eval_pairs(self, heldout) -> np.ndarray:
    n = self.graph.n_nodes
    has_out_N = (self.next_NxK >= 0).any(axis=1)
    pairs = []
    for a in range(0, n, 256):
      o_Cx1 = np.arange(a, min(a + 256, n))[:, None]
      d = self.dist_NxN[a:a + 256]
      ok = (d >= 1) & (d <= self.max_hops) & has_out_N[o_Cx1] & heldout(o_Cx1, np.arange(n)[None])
      o, dd = np.nonzero(ok)
      pairs.append(np.stack([o + a, dd], axis=1))
    pairs = np.concatenate(pairs).astype(np.int32)
    if len(pairs) == 0:
      raise ValueError(f"no held-out (origin, destination) pair within {self.max_hops} hops")
    return pairs

  def prompt(self, pairs_Bx2: np.ndarray) -> np.ndarray:
    """Token rows [origin, destination] of node-index pairs."""
    return self.node_tokens_N[pairs_Bx2].astype(np.int32)

  def backward_walk(self, node: int, steps: int, rng: np.random.Generator) -> list[int] | None:
    """Tokens [start, ., d_1 .. d_steps] of a walk of `steps` moves ending at `node`, drawn backwards
    uniformly over incoming edges (the destination slot is left as -1); None at a node with none."""
    dirs = []
    for _ in range(steps):
      lo, hi = self.in_ptr[node], self.in_ptr[node + 1]
      if hi == lo:
        return None
      e = lo + int(rng.integers(hi - lo))
      dirs.append(int(self.dir_tokens_K[self.in_dir_E[e]]))
      node = int(self.in_src_E[e])
    return [int(self.node_tokens_N[node]), -1, *dirs[::-1]]


def hop_distances(next_NxK: np.ndarray) -> np.ndarray:
  """BFS hop distance on the directed graph, int16 (n, n); -1 where unreachable."""
  import scipy.sparse
  import scipy.sparse.csgraph
  n = next_NxK.shape[0]
  src, k = np.nonzero(next_NxK >= 0)
  adj = scipy.sparse.csr_matrix((np.ones(len(src)), (src, next_NxK[src, k])), shape=(n, n))
  out = np.empty((n, n), np.int16)
  for a in range(0, n, 512):
    d = scipy.sparse.csgraph.shortest_path(adj, directed=True, unweighted=True,
                                           indices=np.arange(a, min(a + 512, n)))
    out[a:a + 512] = np.where(np.isfinite(d), d, -1).astype(np.int16)
  return out


class Tracer:
  """Follows rows of tokens from their origins (after the two prompt tokens), vectorised."""

  def __init__(self, world: World, origin_B: np.ndarray, dest_B: np.ndarray):
    self.w = world
    self.node_B, self.dest_B = origin_B.astype(np.int32).copy(), dest_B.astype(np.int32)
    self.legal_B = np.ones(len(origin_B), bool)
    self.ended_B = np.zeros(len(origin_B), bool)
    self.reached_B = np.zeros(len(origin_B), bool)

  @property
  def tracing_B(self) -> np.ndarray:
    return self.legal_B & ~self.ended_B

  def legal_token_B(self, tokens_B: np.ndarray) -> np.ndarray:
    """Whether each token is a legal direction at the current node."""
    k_B = self.w.dir_of_token_V[tokens_B]
    return (k_B >= 0) & (self.w.next_NxK[self.node_B, np.maximum(k_B, 0)] >= 0)

  def push(self, tokens_B: np.ndarray, active_B: np.ndarray | None = None) -> None:
    """Appends one token per row (rows with active_B False are left as they are)."""
    live = self.tracing_B if active_B is None else self.tracing_B & active_B
    is_end = tokens_B == self.w.eos_id
    move = self.legal_token_B(tokens_B)
    self.reached_B |= live & is_end & (self.node_B == self.dest_B)
    self.ended_B |= live & is_end
    self.legal_B &= ~(live & ~is_end & ~move)
    k_B = np.maximum(self.w.dir_of_token_V[tokens_B], 0)
    self.node_B = np.where(live & move, self.w.next_NxK[self.node_B, k_B], self.node_B)

  @classmethod
  def of_rows(cls, world: World, rows_BxT: np.ndarray) -> Tracer:
    """Traces whole rows `origin destination tokens...`; each row ends at its first pad token."""
    tr = cls(world, world.node_of_token_V[rows_BxT[:, 0]], world.node_of_token_V[rows_BxT[:, 1]])
    live_B = np.ones(len(rows_BxT), bool)
    for t in range(2, rows_BxT.shape[1]):
      live_B &= rows_BxT[:, t] != world.pad_id
      tr.push(rows_BxT[:, t], live_B)
    return tr


class OracleLM:
  """The true world model: at (node, destination) 0.6 on the shortest-path move (`end` at the
  destination), 0.4 shared by the other legal tokens (each > ε = 0.01); `end` where nothing is legal
  (a sink off the destination, or an illegal prefix)."""

  def __init__(self, world: World):
    self.w, self.vocab_size = world, world.vocab_size

  def _logp(self, tr: Tracer, started_B: np.ndarray) -> np.ndarray:
    w, B = self.w, len(tr.node_B)
    p_BxV = np.zeros((B, self.vocab_size))
    nxt_BxK = w.next_NxK[tr.node_B]
    legal_BxK = nxt_BxK >= 0
    d_BxK = w.dist_NxN[np.maximum(nxt_BxK, 0), tr.dest_B[:, None]].astype(np.int32)
    d_BxK = np.where(d_BxK >= 0, d_BxK, 1 << 20)  # unreachable: after every reachable move
    best_B = np.argmin(np.where(legal_BxK, d_BxK, 1 << 21), axis=1)  # the first shortest-path move
    at_dest_B = tr.node_B == tr.dest_B
    n_legal_B = legal_BxK.sum(1) + at_dest_B
    rest_B = np.where(n_legal_B > 1, 0.4 / np.maximum(n_legal_B - 1, 1), 0.0)
    p_BxV[:, w.dir_tokens_K] = legal_BxK * rest_B[:, None]
    p_BxV[:, w.eos_id] = at_dest_B * rest_B
    top_B = np.where(at_dest_B, w.eos_id, w.dir_tokens_K[best_B])
    p_BxV[np.arange(B), top_B] = np.where(n_legal_B > 1, 0.6, 1.0)
    stuck_B = (n_legal_B == 0) | ~tr.tracing_B  # a sink off the destination, or an illegal prefix
    p_BxV[stuck_B] = 0.0
    p_BxV[stuck_B, w.eos_id] = 1.0
    p_BxV[~started_B] = 1.0 / self.vocab_size  # after the origin alone: any destination
    with np.errstate(divide="ignore"):
      return np.log(p_BxV).astype(np.float32)

  def start(self, prompt_BxP, len_B, max_new=0):
    w = self.w
    tr = Tracer(w, w.node_of_token_V[prompt_BxP[:, 0]], w.node_of_token_V[prompt_BxP[:, 1]])
    for t in range(2, prompt_BxP.shape[1]):
      tr.push(prompt_BxP[:, t], t < len_B)
    return tr, self._logp(tr, len_B >= 2)

  def step(self, tr, tokens_B):
    tr.push(tokens_B)
    return tr, self._logp(tr, np.ones(len(tokens_B), bool))

  def teacher_force(self, tokens_BxT):
    w, (B, T) = self.w, tokens_BxT.shape
    tr = Tracer(w, w.node_of_token_V[tokens_BxT[:, 0]], w.node_of_token_V[tokens_BxT[:, 1]])
    argmax_BxT1, logp_BxT1 = np.zeros((B, T - 1), np.int32), np.zeros((B, T - 1), np.float32)
    for t in range(T - 1):  # tokens 0..t predict token t+1
      if t >= 2:
        tr.push(tokens_BxT[:, t])
      logp_BxV = self._logp(tr, np.full(B, t >= 1))
      argmax_BxT1[:, t] = np.argmax(logp_BxV, axis=1)
      logp_BxT1[:, t] = logp_BxV[np.arange(B), tokens_BxT[:, t + 1]]
    return argmax_BxT1, logp_BxT1


def _chunks(n: int, size: int):
  """Index arrays of `size` rows covering 0..n-1 (the last padded with repeats of row 0) and the
  number of real rows in each."""
  for a in range(0, n, size):
    idx = np.arange(a, min(a + size, n))
    yield np.concatenate([idx, np.zeros(size - len(idx), idx.dtype)]), len(idx)


def _pad_rows(rows: list[list[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), width), pad, np.int32)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out, np.array([len(r) for r in rows], np.int32)


def generate(lm: LM, prompt_BxP: np.ndarray, len_B: np.ndarray, steps: int, eos_id: int, pad_id: int,
             pick: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
  """(B, steps) tokens chosen by pick(step, logp_BxV) after each prompt; pad after a row's `end`."""
  state, logp_BxV = lm.start(prompt_BxP, len_B, steps)
  B = prompt_BxP.shape[0]
  out, done = np.full((B, steps), pad_id, np.int32), np.zeros(B, bool)
  for s in range(steps):
    tokens_B = pick(s, logp_BxV).astype(np.int32)
    out[:, s] = np.where(done, pad_id, tokens_B)
    done |= tokens_B == eos_id
    if done.all() or s == steps - 1:
      break
    state, logp_BxV = lm.step(state, tokens_B)
  return out
