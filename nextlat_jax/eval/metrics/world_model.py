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

import numpy as np

from nextlat_jax.eval.metrics.street_world import (  # noqa: F401  (the metrics' public names, re-exported)
  COMPRESSION_MODES,
  DETOUR_KINDS,
  FAMILIES,
  LM,
  OracleLM,
  Settings,
  Tracer,
  World,
  _chunks,
  _pad_rows,
  generate,
  hop_distances,
)
from nextlat_jax.eval.metrics.world_model_state import compression, detour_robustness


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
