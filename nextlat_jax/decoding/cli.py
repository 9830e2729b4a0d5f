"""`nextlat generate --workdir=DIR --prompt=...`: sample from a trained run, autoregressively (KV cache)
or by self-speculative decoding with the run's latent dynamics model.

Prompts are text in the run's tokenizer (space-separated words for the word-level street-grid /
Manhattan data), or token ids with --prompt_ids=1,2,3 (several prompts separated by ';'). Every prompt
of one call is decoded in one batch. Output: one JSON line per prompt, then (with --speculative) one
line of acceptance statistics.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags

from nextlat_jax.config import ConfigError
from nextlat_jax.decoding import draft_policies, head_drafters, speculative
from nextlat_jax.decoding import generate as gen
from nextlat_jax.run import Run, load_run

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt", [], "A text prompt in the run's tokenizer (repeat the flag for a batch).")
flags.DEFINE_string("prompts_file", None, "A file of text prompts, one per line (blank lines skipped).")
flags.DEFINE_string("prompt_ids", None, "Token-id prompts: '1,2,3' (several separated by ';').")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if EOS comes first).")
flags.DEFINE_float("temperature", 1.0, "0: greedy; otherwise sampling temperature (clamped to >= 1e-6).")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off); applied after the temperature.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off); applied after top-k.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("stop_at_eos", True, "Stop a sequence at its first generated EOS.")
flags.DEFINE_bool("kv_cache", True, "Use the KV cache (off: the paper's no-cache baseline, a full forward per call).")
flags.DEFINE_bool("speculative", False, "Self-speculative decoding with the run's dynamics model (NextLat runs).")
flags.DEFINE_enum("policy", "fixed", list(draft_policies.KINDS), "Draft-length policy (--speculative).")
flags.DEFINE_integer("gamma", 4, "Draft length (fixed), cap (confidence / cumulative) or start (adaptive); "
                     "counts the exact first draft in mode A.")
flags.DEFINE_integer("gamma_max", 10, "Largest draft length (the adaptive policy's bound, the static buffer).")
flags.DEFINE_float("threshold", None, "Confidence / cumulative threshold (default: the policy preset's).")
flags.DEFINE_enum("mode", "A", list(speculative.MODES), "A: draft 1 from the true h (paper, 2 trunk calls per "
                  "round); B: all drafts from p_psi (1 trunk call per round).")


# Objectives whose next-token model is none of: a GPT trunk with its head, JTP's Fetch slot 0, MTP's head 0.
UNDECODABLE = {"bst": "BST predicts through its text head on (prefix, suffix) pairs"}


def head(run: Run) -> gen.Head | None:
  """The run's output path for decoding; None: the trunk's head (GPT, NextLat, DeepSeek MTP)."""
  name = run.config.objective.name
  if name in UNDECODABLE:
    raise ValueError(f"objective.name={name!r}: decoding is not supported ({UNDECODABLE[name]})")
  if name == "jtp":
    return head_drafters.jtp_head(run.modules["fetch"], run.cfg)
  if name == "mtp":
    return head_drafters.mtp_head(run.cfg, int(run.config.objective.horizon) + 1)
  return None


def drafter(run: Run) -> speculative.Drafter | None:
  """The run's self-speculative drafter (p_psi, JTP's Fetch slots, MTP's heads); None for other objectives."""
  name = run.config.objective.name
  if name == "nextlat":
    return speculative.nextlat_drafter(run.modules["dynamics"], run.cfg)
  if name == "jtp":
    return head_drafters.jtp_drafter(run.modules["fetch"], run.cfg)
  if name == "mtp":
    return head_drafters.mtp_drafter(run.cfg, int(run.config.objective.horizon) + 1)
  return None


def text_tokenizer(run: Run) -> Any:
  """The run's tokenizer (encode(str) -> ids, decode(ids) -> words), or a clear ValueError."""
  if run.tokenizer is None:
    raise ValueError(f"data.name={run.config.data.name!r}: no text tokenizer for this dataset; use --prompt_ids")
  return run.tokenizer


def read_prompts(run: Run) -> tuple[list[list[int]], Any]:
  """Prompts from the flags as token-id lists, and the tokenizer (None for --prompt_ids)."""
  vocab = run.cfg.vocab_size
  if FLAGS.prompt_ids is not None:
    if FLAGS.prompt or FLAGS.prompts_file:
      raise ValueError("--prompt_ids: give either token ids or text prompts (--prompt / --prompts_file), not both")
    try:
      ids = [[int(t) for t in p.split(",") if t.strip()] for p in FLAGS.prompt_ids.split(";") if p.strip()]
    except ValueError:
      raise ValueError(f"--prompt_ids={FLAGS.prompt_ids!r}: expected comma-separated integers") from None
    bad = [t for p in ids for t in p if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"--prompt_ids={FLAGS.prompt_ids!r}: token {bad[0]} is outside [0, {vocab})")
    return ids, None
  texts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    if not os.path.isfile(FLAGS.prompts_file):
      raise ValueError(f"--prompts_file={FLAGS.prompts_file!r}: file not found")
    with open(FLAGS.prompts_file, encoding="utf-8") as f:
      texts += [line.strip() for line in f if line.strip()]
  if not texts:
    raise ValueError("no prompt: give --prompt, --prompts_file or --prompt_ids")
  tok = text_tokenizer(run)
  ids = []
  for text in texts:
    try:
      ids.append([int(t) for t in tok.encode(text)])
    except ValueError as e:
      raise ValueError(f"--prompt={text!r}: {e}") from None
  return ids, tok


def policy_from_flags() -> draft_policies.DraftPolicy:
  kind = FLAGS.policy
  if kind in ("confidence", "cumulative"):
    threshold = draft_policies.presets()[kind].threshold if FLAGS.threshold is None else FLAGS.threshold
    return draft_policies.DraftPolicy(kind, gamma=FLAGS.gamma, threshold=threshold)
  if kind == "adaptive":
    return draft_policies.DraftPolicy(kind, gamma=FLAGS.gamma, gamma_max=FLAGS.gamma_max)
  return draft_policies.DraftPolicy(kind, gamma=FLAGS.gamma)


def decode(run: Run, prompts: list[list[int]], key: jax.Array, sampling: gen.Sampling, max_new: int, *,
           speculative_mode: str | None = None, policy: draft_policies.DraftPolicy | None = None,
           gamma_max: int = 10, stop_at_eos: bool = True, use_cache: bool = True) -> gen.Output:
  """Generates for a batch of token-id prompts (speculative when speculative_mode is "A" or "B")."""
  out_head = head(run)
  prompt_BxP, len_B = gen.pad_prompts(prompts, run.pad_id)
  common = dict(cfg=run.cfg, sampling=sampling, max_new=max_new, eos_id=run.eos_id, pad_id=run.pad_id,
                stop_at_eos=stop_at_eos, use_cache=use_cache)
  if speculative_mode is None:
    return gen.generate_jit(run.params, prompt_BxP, len_B, key, head=out_head, **common)
  run_drafter = drafter(run)
  if run_drafter is None:
    raise ValueError(f"objective.name={run.config.objective.name!r}: no drafter for speculative decoding "
                     "(NextLat, MTP and JTP runs only)")
  policy = policy or draft_policies.DraftPolicy()
  if policy.longest > gamma_max:
    raise ValueError(f"gamma={policy.longest}: exceeds gamma_max={gamma_max}")
  return speculative.generate_jit(run.params, prompt_BxP, len_B, key, policy.arrays(), drafter=run_drafter,
                                  gamma_max=gamma_max, mode=speculative_mode, head=out_head, **common)


def generate(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("generate needs --workdir")
  try:
    sampling = gen.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    policy = policy_from_flags() if FLAGS.speculative else None
    if FLAGS.max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens}: must be >= 1")
    run = load_run(FLAGS.workdir, FLAGS.step)
    head(run)  # refuses undecodable objectives before reading prompts
    prompts, tok = read_prompts(run)
    out = decode(run, prompts, jax.random.PRNGKey(FLAGS.seed), sampling, FLAGS.max_new_tokens,
                 speculative_mode=FLAGS.mode if FLAGS.speculative else None, policy=policy,
                 gamma_max=FLAGS.gamma_max, stop_at_eos=FLAGS.stop_at_eos, use_cache=FLAGS.kv_cache)
  except ConfigError:  # e.g. no checkpoint in the workdir: the CLI's one `config error:` line
    raise
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  tokens, lengths = np.asarray(out.tokens_BxM), np.asarray(out.lengths_B)
  for prompt, row, n in zip(prompts, tokens, lengths):
    ids = [int(t) for t in row[:n]]
    line = {"prompt_ids": prompt, "output_ids": ids}
    if tok is not None:
      line = {"prompt": " ".join(tok.decode(prompt)), "output": " ".join(tok.decode(ids)), **line}
    print(json.dumps(line))
  if FLAGS.speculative:
    s = {k: np.asarray(v) for k, v in out.stats.items()}
    rounds = int(s["rounds"].sum())
    print(json.dumps({"step": run.step, "mode": FLAGS.mode, "policy": policy.label(), "rounds": rounds,
                      "accepted_per_round": float(s["accepted"].sum()) / max(rounds, 1),
                      "tokens": int(lengths.sum()), "trunk_calls": int(s["trunk_calls"])}))
