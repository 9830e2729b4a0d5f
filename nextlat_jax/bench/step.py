"""`nextlat bench step`: is NextLat's extra step time only its extra arithmetic, and how do the baselines
compare (the paper's Table 4 throughput row)?

In one process and on one mesh, builds GPT and every objective of config.bench.objectives at every
horizon of config.bench.horizons (NextLat, MTP, JTP, DeepSeek MTP; BST has no horizon) train steps
of the SAME model config on the SAME batch, compiles each ahead of time, warms each up, then times
them interleaved round-robin (config.bench.rounds rounds, the variant order rotated each round,
config.bench.steps_per_round steps per variant and round, `jax.block_until_ready` after each group).
A jitted float32 matmul reference at the model's own matmul shapes runs in the same rounds.

Reported per variant: median step time; model FLOPs per step (nextlat_jax.flops); the time ratio to GPT
(median over rounds of the per-round ratio, so load drifts common to a round cancel); the FLOP ratio;
their quotient; achieved FLOP/s; achieved / matmul FLOP/s; the compiled step's per-device memory
(train/sizes.step_memory); and the paper's Table 4 step-time ratio (B200, 1.3B model) next to ours. Targets (from the issues): NextLat time ratio <= tolerance x FLOP ratio
for every d, and GPT FLOP/s >= min_matmul_fraction x matmul FLOP/s; baselines are reported, not gated.

Rows: with config.data.name == "random" (configs/bench_step.py) random tokens are packed into documents
separated by EOS (document ids, positions and loss masks as in nextlat_jax.data.packing); any other
data config supplies real rows through nextlat_jax.data.pipeline.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nextlat_jax import config as config_lib
from nextlat_jax import flops as flops_lib
from nextlat_jax.data import packing
from nextlat_jax.models.transformer import REMAT_POLICIES, ffn_width
from nextlat_jax.parallel.mesh import make_mesh, mesh_shape
from nextlat_jax.bench.step_table import format_table
from nextlat_jax.train import sizes
from nextlat_jax.train import step as step_lib
from nextlat_jax.train.mfu import peak_flops_per_device

BENCH_DEFAULTS = dict(objectives=("nextlat",), horizons=(1, 2, 8), remats=(), bst_pair_fraction=0.1,
                      fit_batch=False, memory_limit_gib=0.0, memory_fraction=0.95, warmup_steps=2, rounds=10, steps_per_round=2, matmul_repeats=3,
                      time_vs_flop_tolerance=1.03, min_matmul_fraction=0.5)
HORIZON_OBJECTIVES = {"nextlat": "NextLat", "mtp": "MTP", "jtp": "JTP", "mtp_deepseek": "DeepSeek MTP"}
# Paper Table 4 (BASELINES.md section 8): steps/s on one B200, 1.3B model, 33k-token batch.
PAPER_STEPS_PER_S = {"GPT": 3.09, "BST": 0.89, "MTP d=1": 2.80, "MTP d=2": 2.58, "MTP d=8": 1.70,
                     "JTP d=1": 3.15, "JTP d=2": 2.92, "JTP d=8": 2.02,
                     "NextLat d=1": 3.09, "NextLat d=2": 2.79, "NextLat d=8": 1.73}
SINGLE_DEVICE_MESH = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))


def bench_settings(config: ml_collections.ConfigDict) -> dict:
  out = dict(BENCH_DEFAULTS)
  if "bench" in config:
    out.update(config.bench.to_dict())
  out["horizons"] = tuple(int(d) for d in out["horizons"])
  out["objectives"] = tuple(str(o) for o in out["objectives"])
  out["remats"] = tuple(str(r) for r in out["remats"])
  for r in out["remats"]:
    if r not in REMAT_POLICIES:
      raise config_lib.ConfigError("bench.remats", r, f"unknown (known: {', '.join(REMAT_POLICIES)})")
  for o in out["objectives"]:
    if o not in (*HORIZON_OBJECTIVES, "bst"):
      raise config_lib.ConfigError("bench.objectives", o, f"unknown (known: {', '.join([*HORIZON_OBJECTIVES, 'bst'])})")
  return out


def random_packed_rows(rng: np.random.Generator, batch: int, row_len: int, vocab: int, eos_id: int,
                       mean_doc_len: int) -> np.ndarray:
  """(batch, row_len) int32 tokens: uniform non-EOS tokens in documents of U[m/2, 3m/2] tokens, each
  starting with an EOS (the EOS belongs to the following document); a row starts mid-document."""
  tokens = rng.integers(0, vocab - 1, size=(batch, row_len), dtype=np.int64)
  tokens = np.where(tokens >= eos_id, tokens + 1, tokens)  # skip the EOS id
  lo, hi = max(1, mean_doc_len // 2), max(2, (3 * mean_doc_len) // 2 + 1)
  for b in range(batch):
    p = int(rng.integers(0, hi))
    while p < row_len:
      tokens[b, p] = eos_id
      p += int(rng.integers(lo, hi))
  return tokens.astype(np.int32)


def _resolve(config: ml_collections.ConfigDict, num_devices: int) -> tuple[ml_collections.ConfigDict, dict, int]:
  """Fills vocab / EOS, validates for `num_devices`, and returns (config, local batch rows, row_len)."""
  config = ml_collections.ConfigDict(config.to_dict())
  B = int(config.batch_size)
  data = config.get("data")
  if data is None or data.get("name", "random") == "random":
    data = data or ml_collections.ConfigDict(dict(seq_len=128, eos_id=0, mean_doc_len=64, context_length=-1))
    vocab, eos = int(config.model.vocab_size), int(data.get("eos_id", 0))
    config_lib.validate(config, num_devices)
    if not 0 <= eos < vocab:
      raise config_lib.ConfigError("data.eos_id", eos, f"must be in [0, model.vocab_size={vocab})")
    L = int(data.seq_len) + 1
    tokens = random_packed_rows(np.random.default_rng(int(config.seed)), B, L, vocab, eos,
                                int(data.get("mean_doc_len", 64)))
    ctx = int(data.get("context_length", -1))
    rows = packing.pack_row_fields(tokens, eos, ctx if ctx >= 0 else None)
    with config.unlocked():
      config.data = ml_collections.ConfigDict(dict(data.to_dict(), name="random", eos_id=eos))
    return config, rows, L
  from nextlat_jax.data import pipeline
  from nextlat_jax.train.preflight import resolve
  config, info = resolve(config, num_devices)
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=B, seed=int(config.seed),
                             process_index=0, process_count=1)
  return config, {k: np.asarray(v) for k, v in ds[0].items()}, info.row_len


def _mesh_and_config(config: ml_collections.ConfigDict):
  """config.mesh if it fits the devices and the batch, else a single-device mesh."""
  n = jax.device_count()
  try:
    shape = mesh_shape(config.mesh, n)
    fits = (all(s >= 1 for s in shape) and shape[0] * shape[1] * shape[2] == n
            and int(config.batch_size) % (shape[0] * shape[1]) == 0)
  except ValueError:
    fits = False
  if fits:
    return make_mesh(config.mesh), config, n
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(SINGLE_DEVICE_MESH.to_dict())
  return make_mesh(config.mesh, jax.devices()[:1]), config, 1


def variant_configs(config: ml_collections.ConfigDict, settings: dict) -> list[tuple[str, Any]]:
  """[(label, config)]: GPT first, then each of settings["objectives"] at each horizon (BST once, with
  settings["bst_pair_fraction"] of its pairs, the paper's FineWeb throughput setting); with
  settings["remats"], every one of those under each remat policy (labels get " [remat=...]")."""
  if settings["remats"]:
    out = []
    for r in settings["remats"]:
      c = ml_collections.ConfigDict(config.to_dict())
      c.model.remat = r
      out += [(f"{label} [remat={r}]", v) for label, v in variant_configs(c, dict(settings, remats=()))]
    return out
  out = []
  plan = [("gpt", 0)]
  for name in settings["objectives"]:
    plan += [(name, 0)] if name == "bst" else [(name, d) for d in settings["horizons"]]
  for name, d in plan:
    c = ml_collections.ConfigDict(config.to_dict())
    c.objective.name = name
    if d:
      c.objective.horizon = d
    if name == "bst":
      c.objective.bst_pair_fraction = float(settings["bst_pair_fraction"])
    label = {"gpt": "GPT", "bst": "BST"}.get(name) or f"{HORIZON_OBJECTIVES[name]} d={d}"
    out.append((label, c))
  return out


def matmul_reference(config: ml_collections.ConfigDict, tokens: int):
  """A jitted float32 function of independent matmuls at the trunk's and head's forward shapes
  (tokens x D @ D x 3D, D x D, D x 2F, tokens x F @ F x D, tokens x D @ D x V); returns (fn, args, flops)."""
  m = config.model
  D, V = int(m.d_model), int(m.vocab_size)
  F = ffn_width(D, m.ffn_width)
  keys = jax.random.split(jax.random.PRNGKey(1), 7)
  x = jax.random.normal(keys[0], (tokens, D), jnp.float32)
  f = jax.random.normal(keys[1], (tokens, F), jnp.float32)
  ws = [jax.random.normal(k, s, jnp.float32) * 0.02
        for k, s in zip(keys[2:], [(D, 3 * D), (D, D), (D, 2 * F), (F, D), (D, V)])]

  def fn(x, f, w_qkv, w_out, w_in, w_mlp_out, w_head):
    return x @ w_qkv, x @ w_out, x @ w_in, f @ w_mlp_out, x @ w_head

  flops = 2.0 * tokens * (D * 3 * D + D * D + D * 2 * F + F * D + D * V)
  return jax.jit(fn), (x, f, *ws), flops


def machine_info() -> dict:
  model = platform.processor()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), model)
  except (OSError, subprocess.SubprocessError):
    pass
  return dict(nproc=os.cpu_count(), cpu=model, jax=jax.__version__, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind)


def compiled_memory_bytes(compiled: Any) -> float | None:
  """Per-device bytes of a compiled step (arguments + outputs + temporaries - aliased), if XLA says."""
  mem = sizes.step_memory(compiled, unit=1)
  return None if mem is None else mem["total"]


def device_memory_limit(settings: dict) -> float | None:
  """bench.memory_limit_gib if set, else what the first device reports (None on CPUs)."""
  if float(settings["memory_limit_gib"]) > 0:
    return float(settings["memory_limit_gib"]) * 2**30
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


def fit_batch_size(config: ml_collections.ConfigDict, mesh: Any, settings: dict, row_len: int) -> tuple[int, list]:
  """Largest batch_size / 2^k (k >= 0, still divisible by the mesh's batch shards) whose most expensive
  variant compiles within memory_fraction x the device memory limit. Returns (rows, tried)."""
  limit = device_memory_limit(settings)
  if limit is None:
    raise config_lib.ConfigError("bench.fit_batch", True, "no device memory limit known here: set "
                                 "bench.memory_limit_gib")
  budget = float(settings["memory_fraction"]) * limit
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  cands = variant_configs(config, settings)
  tried, B = [], int(config.batch_size)
  while B >= shards and B % shards == 0:
    label, c = max(cands, key=lambda lc: flops_lib.train_flops_per_step(lc[1], row_len, B)["total"])
    c = ml_collections.ConfigDict(c.to_dict())
    c.batch_size = B
    setup = step_lib.build(c, mesh)
    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, row_len),
                                setup.abstract_rng()).compile()
    used = compiled_memory_bytes(compiled)
    tried.append(dict(batch_rows=B, variant=label, gib=None if used is None else used / 2**30,
                      budget_gib=budget / 2**30))
    print(f"fit: {label} with {B} rows needs {used / 2**30 if used else float('nan'):.2f} GiB "
          f"(budget {budget / 2**30:.2f} GiB)", flush=True)
    if used is not None and used <= budget:
      return B, tried
    B //= 2
  raise config_lib.ConfigError("batch_size", config.batch_size, f"no batch size fits {budget / 2**30:.1f} GiB "
                               f"(tried {[t['batch_rows'] for t in tried]})")


def run(config: ml_collections.ConfigDict) -> dict:
  """Runs the benchmark; returns the results dict (also printed as a table by `main`)."""
  s = bench_settings(config)
  mesh, config, ndev = _mesh_and_config(config)
  config, local_rows, L = _resolve(config, ndev)
  fit = None
  if s["fit_batch"]:
    B_fit, fit = fit_batch_size(config, mesh, s, L)
    with config.unlocked():
      config.batch_size = B_fit
    config, local_rows, L = _resolve(config, ndev)
  B = int(config.batch_size)
  rng = jax.random.PRNGKey(int(config.seed))
  peak = peak_flops_per_device(config)

  variants = []
  for label, c in variant_configs(config, s):
    config_lib.validate(c, ndev)
    setup = step_lib.build(c, mesh)
    t0 = time.perf_counter()
    compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L), setup.abstract_rng()).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled_memory_bytes(compiled)
    batch = step_lib.global_batch(local_rows, setup.batch_sharding)
    state = setup.init(rng)
    for _ in range(int(s["warmup_steps"])):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    variants.append(dict(label=label, config=c, compiled=compiled, state=state, batch=batch,
                         flops=flops_lib.train_flops_per_step(c, L, B), compile_s=compile_s,
                         memory_gib=None if mem is None else mem / 2**30,
                         memory_mib=sizes.step_memory(compiled),
                         loss=float(metrics["loss"]), times=[], cpu_times=[]))

  mm_fn, mm_args, mm_flops = matmul_reference(config, B * (L - 1))
  jax.block_until_ready(mm_fn(*mm_args))
  mm_times: list[float] = []

  def time_variant(v: dict) -> None:
    k = int(s["steps_per_round"])
    state = v["state"]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(k):
      state, metrics = v["compiled"](state, v["batch"], rng)
    jax.block_until_ready((state, metrics))
    v["times"].append((time.perf_counter() - t0) / k)
    v["cpu_times"].append((time.process_time() - c0) / k)
    v["state"] = state

  def time_matmul() -> None:
    k = int(s["matmul_repeats"])
    t0 = time.perf_counter()
    for _ in range(k):
      out = mm_fn(*mm_args)
    jax.block_until_ready(out)
    mm_times.append((time.perf_counter() - t0) / k)

  jobs = [lambda v=v: time_variant(v) for v in variants] + [time_matmul]
  for r in range(int(s["rounds"])):
    for j in range(len(jobs)):
      jobs[(j + r) % len(jobs)]()

  mm_rate = mm_flops / float(np.median(mm_times))
  gpt = variants[0]
  tol, frac = float(s["time_vs_flop_tolerance"]), float(s["min_matmul_fraction"])
  rows = []
  for v in variants:
    t = np.asarray(v["times"])
    time_ratio = float(np.median(t / np.asarray(gpt["times"])))  # paired per round
    flop_ratio = v["flops"]["total"] / gpt["flops"]["total"]
    med = float(np.median(t))
    rows.append(dict(
        variant=v["label"], objective=v["config"].objective.name, remat=v["config"].model.remat,
        horizon=int(v["config"].objective.horizon) if v["config"].objective.name in HORIZON_OBJECTIVES else 0,
        step_ms=med * 1e3, step_ms_p25=float(np.percentile(t, 25)) * 1e3,
        step_ms_p75=float(np.percentile(t, 75)) * 1e3, step_ms_all=[x * 1e3 for x in t],
        step_ms_min=float(t.min()) * 1e3,
        flops=v["flops"]["total"], flops_breakdown=v["flops"], time_ratio=time_ratio,
        time_ratio_of_medians=med / float(np.median(gpt["times"])),
        time_ratio_of_mins=float(t.min()) / float(np.min(gpt["times"])),
        cpu_ms=float(np.median(v["cpu_times"])) * 1e3,
        cpu_time_ratio=float(np.median(np.asarray(v["cpu_times"]) / np.asarray(gpt["cpu_times"]))),
        flop_ratio=flop_ratio, time_over_flop_ratio=time_ratio / flop_ratio,
        flops_per_s=v["flops"]["total"] / med, matmul_fraction=v["flops"]["total"] / med / mm_rate,
        tokens_per_s=B * (L - 1) / med, mfu=None if peak is None else v["flops"]["total"] / med / (peak * ndev),
        memory_gib=v["memory_gib"], memory_mib=v["memory_mib"], compile_s=v["compile_s"],
        loss_after_warmup=v["loss"],
        paper_time_ratio=(PAPER_STEPS_PER_S["GPT"] / PAPER_STEPS_PER_S[v["label"]]
                          if v["label"] in PAPER_STEPS_PER_S else None)))
  targets = [dict(name=f"{r['variant']}: time ratio <= {tol:g} x FLOP ratio",
                  value=r["time_over_flop_ratio"], limit=tol, passed=r["time_over_flop_ratio"] <= tol)
             for r in rows[1:] if r["objective"] == "nextlat"]
  targets.append(dict(name=f"GPT FLOP/s >= {frac:g} x matmul FLOP/s", value=rows[0]["matmul_fraction"],
                      limit=frac, passed=rows[0]["matmul_fraction"] >= frac))
  m = config.model
  return dict(
      machine=machine_info(), mesh=dict(mesh.shape), batch_rows=B, row_len=L,
      model=dict(n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head, vocab_size=m.vocab_size,
                 ffn_width=ffn_width(int(m.d_model), m.ffn_width), dynamics_hidden=config.dynamics.hidden,
                 dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
                 remat_rollout=bool(config.objective.remat_rollout)),
      peak_flops_per_device=peak, fit=fit,
      bench=dict(s), matmul=dict(flops=mm_flops, ms=float(np.median(mm_times)) * 1e3,
                                 ms_all=[x * 1e3 for x in mm_times], flops_per_s=mm_rate),
      variants=rows, targets=targets, passed=all(t["passed"] for t in targets))


def _flag_workdir() -> str | None:
  try:
    from absl import flags
    return flags.FLAGS.workdir if flags.FLAGS.is_parsed() and "workdir" in flags.FLAGS else None
  except Exception:  # noqa: BLE001 - absl absent or flags not defined: no workdir
    return None


def main(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Runs the benchmark, prints the table and PASS/FAIL lines; writes bench_step.json to the workdir
  (the argument, else --workdir when the CLI defined and parsed it)."""
  res = run(config)
  print(format_table(res), flush=True)
  workdir = workdir or _flag_workdir()
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "bench_step.json")
    with open(path, "w") as f:
      json.dump(res, f, indent=2)
    print(f"wrote {path}")
  return res


def command(argv: list[str]) -> None:
  """`nextlat bench step --config=... [--workdir=DIR]` (the CLI's shared --config and --workdir)."""
  del argv
  from absl import app, flags
  if flags.FLAGS.config is None:
    raise app.UsageError("bench step needs --config (e.g. --config=configs/bench_step.py)")
  main(flags.FLAGS.config, flags.FLAGS.workdir)
