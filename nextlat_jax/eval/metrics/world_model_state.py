"""The state tests of the world-model metrics (METRICS.md §3, §5; Vafa et al. 2024): Myhill-Nerode
sequence compression and detour robustness, on the host over `LM` / `World` (street_world.py)."""
from __future__ import annotations

import numpy as np

from nextlat_jax.eval.metrics.street_world import (
  _REDRAWS,
  COMPRESSION_MODES,
  DETOUR_KINDS,
  LM,
  Settings,
  Tracer,
  World,
  _chunks,
  _pad_rows,
  generate,
)


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
