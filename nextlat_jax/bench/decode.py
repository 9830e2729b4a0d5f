"""`nextlat bench decode --workdir=DIR [key=value ...]`: speculative vs autoregressive decoding speed.

Arms, all on the run's restored checkpoint in one process: KV-cached autoregressive (AR), the paper's
no-cache AR (a full trunk forward per token), self-speculative decoding (KV cache) with fixed gamma for
each of `gammas` and each adaptive policy (threshold and start sweeps), and the paper's harness (no-cache
speculative, fixed gamma = `nocache_gamma`) to check the (2 + a) / 2 identity of DECODING.md section 3.
One compiled decoder per mode serves every gamma, policy and temperature (all runtime values).

Prompts: the first `prompt_len` tokens of the first `prompts` rows of the run's eval split; every
arm generates exactly `max_new` tokens per prompt (EOS does not stop it, as in the paper's harness),
`batch` prompts per call (1: the literature's latency setting). Each arm is compiled and warmed up,
then timed `repeats` times, interleaved (per prompt, the arm order rotates each repeat), with
`jax.block_until_ready` after every call. Reported per arm: median over repeats of tokens/s (wall clock)
and of tokens per CPU-second of this process (less sensitive to other load on a shared machine); a = mean
accepted drafter tokens per round (mode A: positions 2..gamma, the paper's convention); tau = tokens
per trunk call; the medians over repeats of the per-repeat speed-ups against cached and no-cache AR.

Settings are positional key=value arguments (absl parses flags before a bench module is imported):
prompts=6 prompt_len=16 max_new=128 repeats=5 batch=1 gammas=2,...,10 confidence=0.3,0.6,0.9
cumulative=0.1,0.3,0.6 adaptive=4:2:1,4:1:1 (start:grow:shrink) temperatures=0,1 modes=A,B gamma_max=10
nocache_gamma=4 seed=0 out=DIR/bench_decode.json. Adaptive policies cap at gamma_max.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nextlat_jax.decoding import draft_policies
from nextlat_jax.decoding import generate as gen
from nextlat_jax.run import Run, load_run

DEFAULTS = dict(prompts=6, prompt_len=16, max_new=128, repeats=5, batch=1, gammas="2,3,4,5,6,7,8,9,10",
                confidence="0.3,0.6,0.9", cumulative="0.1,0.3,0.6", adaptive="4:2:1,4:1:1", temperatures="0,1",
                modes="A,B", gamma_max=10, nocache_gamma=4, seed=0, out="")


def policies(s: dict) -> list[draft_policies.DraftPolicy]:
  """Fixed gamma for each of `gammas`, then the adaptive policies (threshold sweeps, start:grow:shrink)."""
  G = s["gamma_max"]
  out = [draft_policies.DraftPolicy("fixed", gamma=int(g)) for g in s["gammas"].split(",") if g]
  for kind in ("confidence", "cumulative"):
    out += [draft_policies.DraftPolicy(kind, gamma=G, threshold=float(t)) for t in s[kind].split(",") if t]
  for spec in s["adaptive"].split(","):
    if spec:
      start, grow, shrink = (int(v) for v in spec.split(":"))
      out.append(draft_policies.DraftPolicy("adaptive", gamma=start, gamma_max=G, grow=grow, shrink=shrink))
  return out


def parse_settings(args: list[str]) -> dict:
  out = dict(DEFAULTS)
  for arg in args:
    key, eq, value = arg.partition("=")
    if not eq or key not in DEFAULTS:
      raise ValueError(f"bench decode: {arg!r}: expected key=value with key in {sorted(DEFAULTS)}")
    try:
      out[key] = type(DEFAULTS[key])(value)
    except ValueError:
      raise ValueError(f"bench decode: {key}={value!r}: expected {type(DEFAULTS[key]).__name__}") from None
  return out


def machine() -> str:
  devices = jax.devices()
  cpu = platform.processor()
  if not cpu and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  return (f"{platform.machine()} {cpu} ({os.cpu_count()} CPU cores visible), "
          f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}")


def eval_prompts(config: Any, n: int, length: int) -> list[list[int]]:
  from nextlat_jax.data import pipeline
  source = pipeline.make_source(config.data, split="eval", seed=int(config.seed))
  return [[int(t) for t in source[i]["tokens"][:length]] for i in range(n)]


def arms(run: Run, s: dict, sampling: gen.Sampling) -> list[tuple[str, Callable, dict]]:
  """(label, fn(prompts, key) -> Output, info) for every arm at one sampling setting."""
  from nextlat_jax.decoding.cli import decode
  common = dict(stop_at_eos=False, gamma_max=s["gamma_max"])
  out = [("AR (KV cache)", lambda p, k: decode(run, p, k, sampling, s["max_new"], **common), dict(kind="ar")),
         ("AR (no cache)", lambda p, k: decode(run, p, k, sampling, s["max_new"], use_cache=False, **common),
          dict(kind="ar_nocache"))]
  for mode in s["modes"].split(","):
    for pol in policies(s):
      out.append((f"spec {mode}: {pol.label()}",
                  lambda p, k, pol=pol, mode=mode: decode(run, p, k, sampling, s["max_new"], speculative_mode=mode,
                                                          policy=pol, **common),
                  dict(kind=pol.kind, gamma=pol.gamma, mode=mode)))
  if s["nocache_gamma"] > 0:
    pol = draft_policies.DraftPolicy("fixed", gamma=s["nocache_gamma"])
    out.append((f"spec A no cache (paper harness): {pol.label()}",
                lambda p, k: decode(run, p, k, sampling, s["max_new"], speculative_mode="A", policy=pol,
                                    use_cache=False, **common), dict(kind="nocache_spec", gamma=pol.gamma, mode="A")))
  return out


def measure(run: Run, s: dict, sampling: gen.Sampling, prompts: list[list[int]]) -> list[dict]:
  table = arms(run, s, sampling)
  batches = [prompts[i:i + s["batch"]] for i in range(0, len(prompts), s["batch"])]
  key = jax.random.PRNGKey(s["seed"])
  for _, fn, _ in table:  # compile and warm up
    jax.block_until_ready(fn(batches[0], key))
  times = np.zeros((s["repeats"], len(table)))
  cpu = np.zeros((s["repeats"], len(table)))
  tokens = np.zeros((s["repeats"], len(table)))
  counts = [dict() for _ in table]
  for r in range(s["repeats"]):
    for b, batch in enumerate(batches):
      k = jax.random.fold_in(key, r * len(batches) + b)
      for j in np.roll(np.arange(len(table)), r + b):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(table[j][1](batch, k))
        times[r, j] += time.perf_counter() - t0
        cpu[r, j] += time.process_time() - c0
        tokens[r, j] += int(np.asarray(out.lengths_B).sum())
        for name, v in out.stats.items():
          v = np.asarray(v)
          counts[j][name] = counts[j].get(name, 0) + (v.sum(0) if v.ndim == 2 else v.sum())
  tok_s, tok_cpu_s = tokens / times, tokens / cpu
  rows = []
  for j, (label, _, info) in enumerate(table):
    c = counts[j]
    row = dict(arm=label, **info, tokens_per_s=float(np.median(tok_s[:, j])),
               speedup_vs_ar=float(np.median(tok_s[:, j] / tok_s[:, 0])),
               speedup_vs_nocache_ar=float(np.median(tok_s[:, j] / tok_s[:, 1])),
               tokens_per_cpu_s=float(np.median(tok_cpu_s[:, j])),
               cpu_speedup_vs_ar=float(np.median(tok_cpu_s[:, j] / tok_cpu_s[:, 0])),
               tokens_per_trunk_call=float(tokens[:, j].sum() / c["trunk_calls"]))
    if "rounds" in c:
      rounds = max(int(c["rounds"]), 1)
      row.update(a=float(c["accepted"]) / rounds, rounds=int(c["rounds"]),
                 full_round_fraction=float(c["full_rounds"]) / rounds,
                 n_alpha=[round(float(a) / max(float(t), 1), 3) for a, t in zip(c["accepted_at"], c["tried_at"])])
    rows.append(row)
  return rows


def report(rows: list[dict], sampling: gen.Sampling, s: dict) -> tuple[str, dict]:
  label = "greedy" if sampling.greedy else f"T={sampling.temperature:g}"
  lines = [f"### {label}", "",
           "| arm | tokens/s | a | tokens/trunk call | full rounds | x vs AR (cache) | x vs AR (no cache) "
           "| tokens/CPU-s | CPU x vs AR (cache) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    a = f"{r['a']:.2f}" if "a" in r else "-"
    full = f"{r['full_round_fraction']:.2f}" if "a" in r else "-"
    lines.append(f"| {r['arm']} | {r['tokens_per_s']:.1f} | {a} | {r['tokens_per_trunk_call']:.2f} | {full} | "
                 f"{r['speedup_vs_ar']:.2f} | {r['speedup_vs_nocache_ar']:.2f} | {r['tokens_per_cpu_s']:.1f} | "
                 f"{r['cpu_speedup_vs_ar']:.2f} |")
  summary = {}
  for mode in s["modes"].split(","):
    fixed = [r for r in rows if r["kind"] == "fixed" and r["mode"] == mode]
    adaptive = [r for r in rows if r["kind"] in ("confidence", "cumulative", "adaptive") and r["mode"] == mode]
    if fixed and adaptive:
      summary[mode] = {}
      for key, unit in (("tokens_per_s", "tok/s"), ("tokens_per_cpu_s", "tok/CPU-s")):
        best_f = max(fixed, key=lambda r: r[key])
        best_a = max(adaptive, key=lambda r: r[key])
        ratio = best_a[key] / best_f[key]
        summary[mode][key] = dict(best_fixed=best_f["arm"], best_adaptive=best_a["arm"], ratio=ratio,
                                  target_met=ratio >= 1.05)
        lines += ["", f"mode {mode}, {unit}: best fixed {best_f['arm']} ({best_f[key]:.1f}); best adaptive "
                  f"{best_a['arm']} ({best_a[key]:.1f}); ratio {ratio:.3f} -> target (>= 1.05) "
                  f"{'met' if ratio >= 1.05 else 'MISSED'}"]
  for r in rows:
    if r["kind"] == "nocache_spec":
      predicted = (2 + r["a"]) / 2
      summary["identity"] = dict(predicted=predicted, measured=r["speedup_vs_nocache_ar"])
      lines.append(f"paper harness: (2 + a) / 2 = {predicted:.2f} predicted vs {r['speedup_vs_nocache_ar']:.2f} "
                   "measured against no-cache AR")
  return "\n".join(lines), summary


def command(argv: list[str]) -> None:
  from absl import app, flags

  from nextlat_jax.decoding.cli import drafter
  try:
    s = parse_settings(argv[1:])
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  workdir = flags.FLAGS.workdir
  if workdir is None:
    raise app.UsageError("bench decode needs --workdir")
  run = load_run(workdir, flags.FLAGS.step)
  if drafter(run) is None:
    raise app.UsageError(f"bench decode: {workdir} is a {run.config.objective.name} run; it needs a NextLat run")
  prompts = eval_prompts(run.config, s["prompts"], s["prompt_len"])
  print(f"machine: {machine()}\nrun: {workdir} step {run.step}; settings: {json.dumps(s)}\n")
  results = []
  for t in s["temperatures"].split(","):
    sampling = gen.Sampling(float(t))
    rows = measure(run, s, sampling, prompts)
    text, summary = report(rows, sampling, s)
    print(text + "\n", flush=True)
    results.append(dict(temperature=float(t), rows=rows, summary=summary))
  path = s["out"] or os.path.join(workdir, "bench_decode.json")
  with open(path, "w") as f:
    json.dump(dict(machine=machine(), step=run.step, settings=s, results=results), f, indent=2)
  print(f"wrote {path}")
