"""Learning curves with seeds: train an experiment's runs side by side (experiments/curve_experiments.py),
measure the task metric every `eval_every` steps on a fixed held-out set, and write
experiments/results_NAME.md and experiments/results_NAME.png (mean +- std over seeds, one line per
objective, the paper's value and chance dotted).

  python experiments/curves.py --experiment=path_star [--seeds=3] [--budget_hours=1.5]
  nohup python experiments/curves.py --experiment=lm > /tmp/lm_curves.log 2>&1 &    # in the background

Runs advance round-robin one evaluation interval at a time (every objective and seed reaches step k
before any reaches k + eval_every), each from its checkpoint, so a rerun (next session, after a budget
stop, Ctrl-C or a kill) continues every unfinished run where it stopped. Each measurement is appended to
RUN/curve.jsonl; the result files are rewritten after every measurement. --smoke shrinks the model for a
check of the plumbing (its results go to the workdir, not experiments/).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import curve_experiments as registry  # noqa: E402
from experiments.curve_report import read_curve, write_report  # noqa: E402
from nextlat_jax.errors import ConfigError  # noqa: E402


def run_config(exp: registry.Experiment, label: str, seed: int, folder: str, smoke: bool, steps: int):
  c = exp.runs[label](seed, folder)
  if smoke:
    for key, value in registry.SMOKE.items():
      section, _, name = key.rpartition(".")
      (c[section] if section else c)[name] = value
  c.steps = steps
  return c


def advance(exp: registry.Experiment, label: str, seed: int, folder: str, target: int, smoke: bool) -> dict:
  """Trains run (label, seed) to step `target` (from its checkpoint), measures it, appends to curve.jsonl."""
  from nextlat_jax.train import checkpoint, trainer
  run_dir = os.path.join(folder, label, f"seed{seed}")
  config = run_config(exp, label, seed, folder, smoke, target)
  t0, c0 = time.time(), time.process_time()
  trainer.train(config, run_dir)
  latest = checkpoint.manager(os.path.join(run_dir, "checkpoints"), None, read_only=True).latest_step() or 0
  if latest != target:  # a SIGTERM: the trainer saved at a step boundary and returned
    print(f"{run_dir} stopped at step {latest} before {target}; rerun to continue", flush=True)
    sys.exit(0)
  t1 = time.time()
  metrics = exp.measure(run_dir, config)
  row = {"step": target, "rows": target * int(config.batch_size), **metrics, "train_s": round(t1 - t0, 1),
         "eval_s": round(time.time() - t1, 1), "cpu_s": round(time.process_time() - c0, 1)}
  with open(os.path.join(run_dir, "curve.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  return row


def run_experiment(exp: registry.Experiment, folder: str, seeds: int, budget_hours: float, *, smoke: bool = False,
                   steps: int | None = None, eval_every: int | None = None, out: str | None = None,
                   runs: list[str] | None = None, sweep_dir: str | None = None) -> dict:
  """Advances every (label, seed) run (of `runs`; default all) round-robin until each reaches `steps` or
  the budget is spent; rewrites the report after every measurement. Returns {label: {seed: curve rows}}."""
  unknown = sorted(set(runs or ()) - set(exp.runs))
  if unknown:
    raise ConfigError("--runs", ",".join(unknown), f"unknown; {exp.name} has {', '.join(exp.runs)}")
  os.makedirs(folder, exist_ok=True)
  if exp.prepare:
    exp.prepare(folder)
  every = eval_every or exp.eval_every
  total = steps or exp.default_steps(folder)
  if total % every:
    raise ConfigError("--steps", total, f"must be a multiple of eval_every={every}")
  start, deadline = time.time(), time.time() + 3600 * budget_hours
  jobs = [(label, seed) for label in exp.runs if label in (runs or exp.runs) for seed in range(seeds)]
  segments = len(jobs) * (total // every)
  done = sum(1 for label, seed in jobs for r in read_curve(os.path.join(folder, label, f"seed{seed}"))
             if r["step"] <= total)
  out = out or os.path.join(folder, f"results_{exp.name}")
  ran = 0
  for target in range(every, total + 1, every):
    for label, seed in jobs:
      if target in {r["step"] for r in read_curve(os.path.join(folder, label, f"seed{seed}"))}:
        continue
      if time.time() > deadline:
        print(f"budget of {budget_hours} h spent: {done}/{segments} segments done; rerun to continue", flush=True)
        return write_report(exp, folder, seeds, total, out, smoke, sweep_dir)
      row = advance(exp, label, seed, folder, target, smoke)
      done, ran = done + 1, ran + 1
      eta = (time.time() - start) / ran * (segments - done)
      shown = {k: round(v, 3) for k, v in row.items() if k not in ("step", "rows") and isinstance(v, float)}
      print(f"[{done}/{segments}, ETA {eta / 3600:.1f} h] {exp.name} {label} seed {seed} step {target}/{total}: "
            f"{shown}", flush=True)
      write_report(exp, folder, seeds, total, out, smoke, sweep_dir)  # a stop anywhere leaves a current report
  return write_report(exp, folder, seeds, total, out, smoke, sweep_dir)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--experiment", required=True, choices=sorted(registry.EXPERIMENTS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--budget_hours", type=float, default=24.0, help="stop starting segments after this long")
  p.add_argument("--workdir", default="/tmp/nextlat_curves", help="runs go to WORKDIR/EXPERIMENT/LABEL/seedK")
  p.add_argument("--steps", type=int, default=None, help="override the experiment's steps (a multiple of eval_every)")
  p.add_argument("--eval_every", type=int, default=None)
  p.add_argument("--runs", default="", help="comma-separated run labels to advance (default: all)")
  p.add_argument("--sweep_dir", default=None, help="a `nextlat sweep` folder of this experiment's task: its "
                 "finished runs are measured the same way and tabled in the report")
  p.add_argument("--smoke", action="store_true", help="a tiny model: checks the plumbing; results stay in WORKDIR")
  args = p.parse_args()
  if args.seeds < 1:
    raise SystemExit(f"--seeds={args.seeds}: must be >= 1")
  logging.getLogger("nextlat_jax").setLevel(logging.WARNING)
  exp = registry.EXPERIMENTS[args.experiment]
  folder = os.path.join(args.workdir, exp.name + ("_smoke" if args.smoke else ""))
  out = None if args.smoke else os.path.join(REPO, "experiments", f"results_{exp.name}")
  try:
    run_experiment(exp, folder, args.seeds, args.budget_hours, smoke=args.smoke, steps=args.steps,
                   eval_every=args.eval_every, out=out, runs=[r for r in args.runs.split(",") if r],
                   sweep_dir=args.sweep_dir)
  except ConfigError as e:  # a bad flag or value, or a run folder that does not fit: one line, nothing lost
    print(e, file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out or os.path.join(folder, 'results_' + exp.name)}.md and .png", flush=True)


if __name__ == "__main__":
  main()
