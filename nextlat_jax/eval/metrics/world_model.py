"""World-model metrics of the Manhattan / street-grid task (METRICS.md §1-3, §5; Vafa et al. 2024).

A sequence `origin destination d_1 .. d_m [end]` is traced from the origin: every token after the first
two, up to the first `end`, must be a direction with an edge at the current node (`legal`); `reached_end`
additionally needs `end` emitted at the destination. Models are seen through `LM` (host-level start /
step / teacher_force on numpy arrays; the trained model's versions are jitted, see
nextlat_jax.eval.run.TrainedLM), so the same code scores a checkpoint and the true world model
(`OracleLM`). Bookkeeping (tracing, detours, sampling) runs on the host in numpy.

Choices where the spec is silent (all in `Settings`):
- Evaluation pairs: every ordered pair (o, d), o != d, held out by the data's pair hash, o has an
  outgoing edge, BFS hop distance 1..max_hops (48, the reference; 50 as an option). The reference's
  extra filter (both nodes are endpoints of a training walk) is dropped: walks are generated on the fly.
- Next-token test: `next_token_walks` held-out walks (1,000, the size of Vafa's validation set).
- Compression: the reference procedure (state drawn from the evaluation pairs, redraws until 100
  trials succeed) in both modes; ε-sampling keeps the most likely token when all fall below ε (HF).
- Sampling uses numpy's PCG64 seeded by `Settings.seed`; greedy ties go to the lowest token id.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
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


def next_token_test(lm: LM, world: World, walks: list[list[int]], batch_size: int, progress=iter) -> dict:
  """% of teacher-forced argmax predictions at prefixes of length >= 2 that are legal (METRICS §1)."""
  width = 32 * -(-max(len(w) for w in walks) // 32)
  rows, lens = _pad_rows(walks, width, world.pad_id)
  correct = total = 0
  for idx, n_real in progress(list(_chunks(len(walks), batch_size))):
    r, n_B = rows[idx][:n_real], lens[idx][:n_real]
    argmax_BxT1, _ = lm.teacher_force(rows[idx])
    argmax_BxT1 = argmax_BxT1[:n_real]
    tr = Tracer(world, world.node_of_token_V[r[:, 0]], world.node_of_token_V[r[:, 1]])
    for t in range(1, width - 1):  # prefix tokens 0..t predict token t+1
      if t >= 2:
        tr.push(r[:, t])
      scored = t <= n_B - 2
      a_B = argmax_BxT1[:, t]
      ok = tr.legal_token_B(a_B) | ((a_B == world.eos_id) & (tr.node_B == tr.dest_B))
      correct += int((ok & scored).sum())
      total += int(scored.sum())
  return {"next_token_test": 100.0 * correct / max(total, 1), "next_token_positions": total,
          "next_token_walks": len(walks)}


def valid_trajectories(lm: LM, world: World, pairs_Px2: np.ndarray, max_new: int, batch_size: int,
                       progress=iter) -> dict:
  """Greedy generations from [origin, destination]: % `reached_end` and % `legal` (METRICS §2),
  and the `reached_end` rate by hop distance."""
  legal, reached = [], []
  for idx, n_real in progress(list(_chunks(len(pairs_Px2), batch_size))):
    pairs = pairs_Px2[idx]
    prompt = world.prompt(pairs)
    out = generate(lm, prompt, np.full(len(idx), 2, np.int32), max_new, world.eos_id, world.pad_id,
                   lambda s, logp: np.argmax(logp, axis=1))
    tr = Tracer(world, pairs[:, 0], pairs[:, 1])
    for s in range(max_new):
      tr.push(out[:, s])
    legal.append(tr.legal_B[:n_real])
    reached.append((tr.legal_B & tr.reached_B)[:n_real])
  legal, reached = np.concatenate(legal), np.concatenate(reached)
  hops = world.dist_NxN[pairs_Px2[:, 0], pairs_Px2[:, 1]]
  by_hops = {int(h): 100.0 * float(reached[hops == h].mean()) for h in np.unique(hops)}
  return {"valid_reached_end": 100.0 * float(reached.mean()), "valid_legal": 100.0 * float(legal.mean()),
          "valid_pairs": int(len(pairs_Px2)), "valid_reached_end_by_hops": by_hops}


def _sampler(rng: np.random.Generator, epsilon: float | None):
  """pick(step, logp) drawing from softmax (temperature 1), with HF's epsilon cut-off if given."""
  def pick(s, logp_BxV):
    p = np.exp(logp_BxV.astype(np.float64))
    if epsilon is not None:
      keep = (p >= epsilon) | (np.arange(p.shape[1])[None] == np.argmax(p, axis=1)[:, None])
      p = np.where(keep, p, 0.0)
    c = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * c[:, -1]
    return np.minimum((c < u[:, None]).sum(axis=1), p.shape[1] - 1)
  return pick


def compression(lm: LM, world: World, settings: Settings, mode: str, rng: np.random.Generator,
                progress=iter) -> dict:
  """Myhill-Nerode sequence compression (METRICS §3): share of trials where every token of every
  suffix sampled after prefix 1 has probability > ε (after prefix 1: `reference`; prefix 2: `vafa`)."""
  if mode not in COMPRESSION_MODES:
    raise ValueError(f"compression mode={mode!r}: expected one of {COMPRESSION_MODES}")
  total_len, eps = (100, None) if mode == "reference" else (128, settings.epsilon)
  trials = []
  for _ in range(_REDRAWS):
    if len(trials) == settings.compression_trials:
      break
    cur, dest = world.pairs_Px2[rng.integers(len(world.pairs_Px2))]
    L = int(rng.integers(1, 95 - int(world.dist_NxN[cur, dest]) + 1))
    p1, p2 = world.backward_walk(int(cur), L, rng), world.backward_walk(int(cur), L, rng)
    if p1 is None or p2 is None or p1 == p2:
      continue
    p1[1] = p2[1] = int(world.node_tokens_N[dest])
    trials.append((p1, p2))
  else:
    raise RuntimeError(f"compression: fewer than {settings.compression_trials} trials after {_REDRAWS} draws")
  S = settings.compression_suffixes
  jobs = [(i, p1, p2) for i, (p1, p2) in enumerate(trials) for _ in range(S)]
  P = 128  # one static prompt width: a prefix has 2 + L <= 96 tokens (L <= 95 - sp, sp >= 1)
  steps = total_len - min(len(p1) for _, p1, _ in jobs)  # one static shape for every batch
  passed = np.ones(len(trials), bool)
  log_eps = np.log(settings.epsilon)
  for idx, n_real in progress(list(_chunks(len(jobs), settings.batch_size))):
    batch = [jobs[i] for i in idx]
    prompt, len_B = _pad_rows([p1 for _, p1, _ in batch], P, world.pad_id)
    out = generate(lm, prompt, len_B, steps, world.eos_id, world.pad_id, _sampler(rng, eps))
    suffixes = []
    for b, (_, p1, _) in enumerate(batch):
      suf = out[b, :total_len - len(p1)].tolist()
      suffixes.append(suf[:suf.index(world.eos_id) + 1] if world.eos_id in suf else suf)
    scored = [(p1 if mode == "reference" else p2) + suf for (_, p1, p2), suf in zip(batch, suffixes)]
    rows, _ = _pad_rows(scored, 128, world.pad_id)
    _, logp_BxT1 = lm.teacher_force(rows)
    for b in range(n_real):
      start, n_suf = len(batch[b][1]), len(suffixes[b])
      ok = bool(np.all(logp_BxT1[b, start - 1:start - 1 + n_suf] > log_eps))
      passed[batch[b][0]] &= ok
  return {f"compression_{mode}": float(passed.mean()), f"compression_{mode}_trials": len(trials)}


def detour_robustness(lm: LM, world: World, settings: Settings, kind: str, rng: np.random.Generator,
                      progress=iter) -> dict:
  """Greedy decoding with detours (METRICS §5): at each step i = 2..99 off the destination, with
  probability p the top-1 token is replaced by an allowed other legal direction. % `legal` and
  % `reached_end`."""
  if kind not in DETOUR_KINDS:
    raise ValueError(f"detour kind={kind!r}: expected one of {DETOUR_KINDS}")
  pairs_Px2 = world.pairs_Px2[rng.integers(len(world.pairs_Px2), size=settings.detour_trials)]
  legal, reached, detours = [], [], 0
  for idx, n_real in progress(list(_chunks(len(pairs_Px2), settings.batch_size))):
    pairs = pairs_Px2[idx]
    tr = Tracer(world, pairs[:, 0], pairs[:, 1])
    count = np.zeros(len(idx), np.int64)

    def pick(s, logp_BxV, tr=tr, count=count):
      i, B = s + 2, len(logp_BxV)
      a_B = np.argmax(logp_BxV, axis=1)
      nxt_BxK = world.next_NxK[tr.node_B]
      sp_BxK = world.dist_NxN[np.maximum(nxt_BxK, 0), tr.dest_B[:, None]].astype(np.int32)
      allowed_BxK = ((nxt_BxK >= 0) & (world.dir_tokens_K[None] != a_B[:, None])
                     & (sp_BxK >= 0) & (sp_BxK <= 95 - i))
      if kind == "random_valid":
        score_BxK = rng.random(allowed_BxK.shape)
      else:
        score_BxK = logp_BxV[:, world.dir_tokens_K] * (1 if kind == "second_most_likely" else -1)
      k_B = np.argmax(np.where(allowed_BxK, score_BxK, -np.inf), axis=1)
      swap_B = (tr.tracing_B & (tr.node_B != tr.dest_B) & (rng.random(B) < settings.detour_prob)
                & allowed_BxK.any(axis=1))
      tokens_B = np.where(swap_B, world.dir_tokens_K[k_B], a_B)
      count += swap_B
      tr.push(tokens_B)
      return tokens_B

    generate(lm, world.prompt(pairs), np.full(len(idx), 2, np.int32), 98, world.eos_id, world.pad_id, pick)
    legal.append(tr.legal_B[:n_real])
    reached.append((tr.legal_B & tr.reached_B)[:n_real])
    detours += int(count[:n_real].sum())
  legal, reached = np.concatenate(legal), np.concatenate(reached)
  main = legal if settings.detour_success == "legal" else reached
  return {f"detour_{kind}": 100.0 * float(main.mean()),
          f"detour_{kind}_legal": 100.0 * float(legal.mean()),
          f"detour_{kind}_reached_end": 100.0 * float(reached.mean()),
          f"detour_{kind}_mean_detours": detours / len(pairs_Px2)}


def world_model_metrics(lm: LM, world: World, walks: list[list[int]], settings: Settings = Settings(),
                        progress: Callable = lambda it, desc=None: it,
                        families: Sequence[str] = FAMILIES) -> dict:
  """The world-model metrics of Table 1 (plus their variants) for one model: those of `families`
  (FAMILIES: next_token, valid_trajectories, compression, detours)."""
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise ValueError(f"world-model metric families {unknown}: unknown; known: {', '.join(FAMILIES)}")
  # One random stream per family: a family's numbers do not depend on which others run.
  pairs_rng, compression_rng, detour_rng = (np.random.default_rng([settings.seed, i]) for i in range(3))
  out = {"eval_pairs_available": int(len(world.pairs_Px2)), "max_hops": world.max_hops,
         **({"epsilon": settings.epsilon} if "compression" in families else {}),
         **({"detour_prob": settings.detour_prob} if "detours" in families else {})}
  if "next_token" in families:
    out.update(next_token_test(lm, world, walks, settings.batch_size, lambda it: progress(it, "next-token test")))
  if "valid_trajectories" in families:
    pairs = world.pairs_Px2[pairs_rng.integers(len(world.pairs_Px2), size=settings.num_pairs)]
    out.update(valid_trajectories(lm, world, pairs, settings.max_new_tokens, settings.batch_size,
                                  lambda it: progress(it, "valid trajectories")))
  for mode in settings.compression_modes if "compression" in families else ():
    out.update(compression(lm, world, settings, mode, compression_rng,
                           lambda it, m=mode: progress(it, f"compression ({m})")))
  for kind in settings.detour_kinds if "detours" in families else ():
    out.update(detour_robustness(lm, world, settings, kind, detour_rng,
                                 lambda it, k=kind: progress(it, f"detours ({k})")))
  return out


def settings_for(num_samples: int | None, batch_size: int, seed: int, **overrides) -> Settings:
  """The spec's Settings, with every sample count set to num_samples when given."""
  counts = {}
  if num_samples is not None:
    counts = dict(num_pairs=num_samples, next_token_walks=num_samples, compression_trials=num_samples,
                  detour_trials=num_samples)
  return Settings(batch_size=batch_size, seed=seed, **{**counts, **overrides})


def evaluate(run) -> dict:
  """TASK_METRICS entry for street_grid / manhattan runs (a nextlat_jax.eval.run.TaskRun): Table 1's
  world-model metrics; plots the valid-trajectory rate by hop distance."""
  from nextlat_jax.data.tasks import walks as walks_lib
  from nextlat_jax.data.tasks.manhattan import heldout_mask
  from nextlat_jax.eval import plots
  opts = run.options
  batch_size = -(-run.batch_size // run.row_multiple) * run.row_multiple
  overrides = dict(opts.get("world_model") or {})  # Settings fields, e.g. {"max_hops": 50}
  unknown = set(overrides) - {f.name for f in dataclasses.fields(Settings)}
  if unknown:
    raise ValueError(f"world-model options {sorted(unknown)}: unknown; Settings has "
                     f"{[f.name for f in dataclasses.fields(Settings)]}")
  settings = settings_for(run.num_samples, batch_size, run.seed, **overrides)
  source = walks_lib.make_source(run.config.data, split="eval", seed=run.seed)
  world = World(source.graph, source.tokenizer,
                lambda o, d: heldout_mask(o, d, source.split_seed, source.heldout_fraction), settings.max_hops)
  rng = np.random.default_rng([run.seed, 1])
  families = FAMILIES if run.families is None else tuple(run.families)
  n_walks = settings.next_token_walks if "next_token" in families else 0
  walks = [source.walk_tokens(*source.sample_walk(rng)) for _ in range(n_walks)]
  out = world_model_metrics(run.lm(), world, walks, settings, run.progress, families)
  if "valid_reached_end_by_hops" in out:
      plots.accuracy_by_length(out["valid_reached_end_by_hops"], os.path.join(run.out_dir, "valid_by_hops.png"),
                             title="valid trajectories (reached end)", xlabel="shortest path (hops)",
                             ylabel="valid (%)")
  return out
