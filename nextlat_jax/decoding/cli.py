"""`nextlat generate --workdir=DIR --prompt=...`: sample from a trained run, autoregressively (KV cache)
or by self-speculative decoding with the run's latent dynamics model.

Prompts are text in the run's tokenizer (space-separated words for the word-level street-grid /
Manhattan data), or token ids with --prompt_ids=1,2,3 (several prompts separated by ';'). Every prompt
of one call is decoded in one batch. Output: one JSON line per prompt (ids; with a tokenizer also the
decoded prompt, continuation and full text; tokens/s), then (with --speculative) one line of acceptance
statistics. Timing: the decode function is compiled ahead of time (`jit(...).lower(...).compile()`, reported
as compile_s) and only the compiled call, up to the tokens being ready on the host, is timed (decode_s);
tokens/s = generated tokens / decode_s.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from nextlat_jax.config import ConfigError
from nextlat_jax.decoding import draft_policies, head_drafters, speculative
from nextlat_jax.decoding import generate as gen
from nextlat_jax.run import Run, load_run, run_config, run_tokenizer

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


def check_decodable(name: str) -> None:
  """ValueError for an objective whose runs cannot decode."""
  if name in UNDECODABLE:
    raise ValueError(f"objective.name={name!r}: decoding is not supported ({UNDECODABLE[name]})")


def head(run: Run) -> gen.Head | None:
  """The run's output path for decoding; None: the trunk's head (GPT, NextLat, DeepSeek MTP)."""
  name = run.config.objective.name
  check_decodable(name)
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


def text_tokenizer(config: ml_collections.ConfigDict) -> Any:
  """The run's tokenizer (encode(str) -> ids, decode(ids) -> text or words), or a clear ValueError."""
  tok = run_tokenizer(config)
  if tok is None:
    raise ValueError(f"data.name={config.data.name!r}: the run has no text tokenizer (token-id data, or a "
                     "source whose tokenizer cannot be opened here); use --prompt_ids")
  return tok


def decode_text(tok: Any, ids: list[int]) -> str:
  """`ids` as text: a text tokenizer's decode, or a word-level tokenizer's words joined by spaces."""
  text = tok.decode(ids)
  return text if isinstance(text, str) else " ".join(text)


def read_prompts(config: ml_collections.ConfigDict) -> tuple[list[list[int]], Any]:
  """Prompts from the flags as token-id lists, and the tokenizer (None for --prompt_ids); `config`: the
  run's saved config (run_config), so prompts are checked before its parameters are read."""
  vocab = int(config.model.vocab_size)
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
  tok = text_tokenizer(config)
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


GEN_STATIC = ("cfg", "max_new", "pad_id", "use_cache", "head")  # gen.generate_jit's static arguments
SPEC_STATIC = ("cfg", "drafter", "max_new", "gamma_max", "pad_id", "mode", "use_cache", "verify_sizes", "head")


def timed_call(jitted: Any, static: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[Any, dict[str, float]]:
  """(jitted(*args, **kwargs) on the host, {"compile_s", "decode_s"}): compiled ahead of time, so decode_s is
  the compiled call alone, until its outputs are on the host."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  t1 = time.perf_counter()
  out = jax.device_get(compiled(*args, **{k: v for k, v in kwargs.items() if k not in static}))
  t2 = time.perf_counter()
  return out, {"compile_s": t1 - t0, "decode_s": t2 - t1}


def _call(jitted: Any, static: tuple[str, ...], args: tuple, kwargs: dict, timed: bool) -> tuple[Any, dict]:
  return timed_call(jitted, static, args, kwargs) if timed else (jitted(*args, **kwargs), {})


def decode(run: Run, prompts: list[list[int]], key: jax.Array, sampling: gen.Sampling, max_new: int, *,
           speculative_mode: str | None = None, policy: draft_policies.DraftPolicy | None = None,
           gamma_max: int = 10, stop_at_eos: bool = True, use_cache: bool = True) -> gen.Output:
  """Generates for a batch of token-id prompts (speculative when speculative_mode is "A" or "B"), through
  the jitted functions (their compile cache is reused across calls)."""
  return _decode(run, prompts, key, sampling, max_new, speculative_mode=speculative_mode, policy=policy,
                 gamma_max=gamma_max, stop_at_eos=stop_at_eos, use_cache=use_cache, timed=False)[0]


def timed_decode(run: Run, prompts: list[list[int]], key: jax.Array, sampling: gen.Sampling, max_new: int,
                 **kwargs: Any) -> tuple[gen.Output, dict[str, float]]:
  """`decode` compiled ahead of time and timed (timed_call): (output on the host, {"compile_s", "decode_s"})."""
  return _decode(run, prompts, key, sampling, max_new, timed=True, **kwargs)


def _decode(run: Run, prompts: list[list[int]], key: jax.Array, sampling: gen.Sampling, max_new: int, *,
            speculative_mode: str | None = None, policy: draft_policies.DraftPolicy | None = None,
            gamma_max: int = 10, stop_at_eos: bool = True, use_cache: bool = True, timed: bool = False
            ) -> tuple[gen.Output, dict[str, float]]:
  out_head = head(run)
  prompt_BxP, len_B = gen.pad_prompts(prompts, run.pad_id)
  common = dict(cfg=run.cfg, sampling=sampling, max_new=max_new, eos_id=run.eos_id, pad_id=run.pad_id,
                stop_at_eos=stop_at_eos, use_cache=use_cache)
  if speculative_mode is None:
    return _call(gen.generate_jit, GEN_STATIC, (run.params, prompt_BxP, len_B, key), dict(head=out_head, **common),
                 timed)
  run_drafter = drafter(run)
  if run_drafter is None:
    raise ValueError(f"objective.name={run.config.objective.name!r}: no drafter for speculative decoding "
                     "(NextLat, MTP and JTP runs only)")
  policy = policy or draft_policies.DraftPolicy()
  if policy.longest > gamma_max:
    raise ValueError(f"gamma={policy.longest}: exceeds gamma_max={gamma_max}")
  return _call(speculative.generate_jit, SPEC_STATIC, (run.params, prompt_BxP, len_B, key, policy.arrays()),
               dict(drafter=run_drafter, gamma_max=gamma_max, mode=speculative_mode, head=out_head, **common), timed)


def generate(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError("generate needs --workdir")
  try:
    sampling = gen.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    policy = policy_from_flags() if FLAGS.speculative else None
    if FLAGS.max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens={FLAGS.max_new_tokens}: must be >= 1")
    config = run_config(FLAGS.workdir, FLAGS.step)  # the saved config: prompts checked before loading
    check_decodable(config.objective.name)
    prompts, tok = read_prompts(config)
    run = load_run(FLAGS.workdir, FLAGS.step)
    out, times = timed_decode(run, prompts, jax.random.PRNGKey(FLAGS.seed), sampling, FLAGS.max_new_tokens,
                              speculative_mode=FLAGS.mode if FLAGS.speculative else None, policy=policy,
                              gamma_max=FLAGS.gamma_max, stop_at_eos=FLAGS.stop_at_eos, use_cache=FLAGS.kv_cache)
  except ConfigError:  # e.g. no checkpoint in the workdir: the CLI's one `config error:` line
    raise
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for line in output_lines(run, prompts, tok, out, times, policy=policy if FLAGS.speculative else None,
                           mode=FLAGS.mode):
    print(json.dumps(line))


def output_lines(run: Run, prompts: list[list[int]], tok: Any, out: gen.Output, times: dict[str, float], *,
                 policy: draft_policies.DraftPolicy | None = None, mode: str = "A") -> list[dict]:
  """`nextlat generate`'s JSON lines: one per prompt (ids; with `tok`, prompt / output / text = the decoded
  prompt, continuation (a generated EOS included) and both; new tokens, tokens_per_sec = its new tokens / the
  batch's decode_s; with `policy`, its rounds and accepted drafts per
  round), then with `policy` (speculative) the batch's line: rounds, accepted_per_round (mean accepted drafts
  per round), tokens_per_round, tokens, tokens_per_sec, compile_s, decode_s, trunk_calls."""
  tokens, lengths = np.asarray(out.tokens_BxM), np.asarray(out.lengths_B)
  dt = max(times["decode_s"], 1e-9)
  s = {k: np.asarray(v) for k, v in out.stats.items()} if policy is not None else {}
  lines = []
  for b, (prompt, row, n) in enumerate(zip(prompts, tokens, lengths)):
    ids = [int(t) for t in row[:n]]
    line: dict[str, Any] = {"prompt_ids": prompt, "output_ids": ids}
    if tok is not None:
      line = {"prompt": decode_text(tok, prompt), "output": decode_text(tok, ids),
              "text": decode_text(tok, prompt + ids), **line}
    line.update(new_tokens=int(n), tokens_per_sec=round(int(n) / dt, 2), decode_s=round(times["decode_s"], 4))
    if policy is not None:
      rounds = int(s["rounds"][b])
      line.update(rounds=rounds, accepted_per_round=round(float(s["accepted"][b]) / max(rounds, 1), 4))
    lines.append(line)
  if policy is not None:
    rounds = int(s["rounds"].sum())
    lines.append({"step": run.step, "mode": mode, "policy": policy.label(), "rounds": rounds,
                  "accepted_per_round": float(s["accepted"].sum()) / max(rounds, 1),
                  "tokens_per_round": float(lengths.sum()) / max(rounds, 1), "tokens": int(lengths.sum()),
                  "tokens_per_sec": round(float(lengths.sum()) / dt, 2), "compile_s": round(times["compile_s"], 3),
                  "decode_s": round(times["decode_s"], 4), "trunk_calls": int(s["trunk_calls"])})
  return lines
