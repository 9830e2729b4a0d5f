"""The result files of experiments/curves.py: OUT.md (setting, compute used, mean +- std per evaluation,
whether the paper's effect appears) and OUT.png (nextlat_jax.eval.plots.seed_curves), from the
curve.jsonl of every run in the experiment's folder."""
from __future__ import annotations

import json
import os
import platform
import time

import jax

from experiments import curve_experiments as registry
from nextlat_jax.eval import plots


def read_curve(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "curve.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def collect(exp: registry.Experiment, folder: str, seeds: int) -> dict[str, dict[int, list[dict]]]:
  """{label: {seed: curve rows by step}} (the latest row of a step wins)."""
  out = {}
  for label in exp.runs:
    out[label] = {}
    for seed in range(seeds):
      by_step = {r["step"]: r for r in read_curve(os.path.join(folder, label, f"seed{seed}"))}
      out[label][seed] = [by_step[s] for s in sorted(by_step)]
  return out


def machine() -> str:
  model = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else model
  return f"{os.cpu_count()} x {model}, {jax.devices()[0].platform}, jax {jax.__version__}"


def series(curves: dict, label: str, key: str) -> dict[int, list[tuple[int, float]]]:
  return {seed: [(r["rows"], r[key]) for r in rows if key in r] for seed, rows in curves[label].items() if rows}


def verdict(exp: registry.Experiment, curves: dict, e: registry.Effect | None = None) -> str:
  """The call on one of the paper's claims (default: the experiment's first)."""
  e = e or exp.effects[0]
  panel = exp.panels[e.panel]
  lines = {name: series(curves, label, key) for name, label, key in panel.lines}
  a, b = lines[e.better], lines[e.other]
  if not a or not b:
    return "No measurement of both lines yet."
  xs_a, mean_a, std_a = plots.mean_std(a)
  xs_b, mean_b, std_b = plots.mean_std(b)
  common = sorted(set(xs_a) & set(xs_b))
  if not common:
    return "No evaluation reached by every run of both lines yet."
  x = common[-1]
  ma, sa = mean_a[xs_a.index(x)], std_a[xs_a.index(x)]
  mb, sb = mean_b[xs_b.index(x)], std_b[xs_b.index(x)]
  na, nb = len(a), len(b)
  diff = (ma - mb) if e.higher_is_better else (mb - ma)
  se = (sa ** 2 / na + sb ** 2 / nb) ** 0.5
  facts = (f"At {x:,} training rows: {e.better} {ma:.3g} +- {sa:.2g} (n={na}) vs {e.other} {mb:.3g} +- {sb:.2g} "
           f"(n={nb}); the difference in the paper's direction is {diff:+.3g} (standard error {se:.2g}).")
  if min(na, nb) < 2:
    call = "With one seed a side there is no noise estimate: no call is made."
  elif e.matches:  # the claim is "no worse": a difference within noise is the paper's picture
    call = ("**NextLat is measured worse** at this budget (more than 2 standard errors)." if diff < -2 * se else
            "**The paper's picture appears** at this budget: no difference beyond 2 standard errors.")
  elif diff > 2 * se and diff > 0:
    call = "**The paper's effect appears** at this budget (more than 2 standard errors in its direction)."
  elif diff < -2 * se:
    call = "**The opposite of the paper's effect** is measured at this budget (more than 2 standard errors)."
  else:
    call = "**The paper's effect does not appear** at this budget: the difference is within 2 standard errors."
  return f"The paper: {e.claim}. {facts} {call}"


def table(exp: registry.Experiment, panel: registry.Panel, curves: dict) -> list[str]:
  names = [name for name, _, _ in panel.lines]
  out = [f"### {panel.title}: {panel.ylabel}, mean +- std over seeds", "",
         "| step | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  by_name = {name: series(curves, label, key) for name, label, key in panel.lines}
  steps = sorted({(r["step"], r["rows"]) for runs in curves.values() for rows in runs.values() for r in rows})
  for step, rows in steps:
    cells = []
    for name in names:
      values = [dict(points)[rows] for points in by_name[name].values() if rows in dict(points)]
      if not values:
        cells.append("")
        continue
      m = sum(values) / len(values)
      s = (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
      cells.append(f"{m:.2f} +- {s:.2f} (n={len(values)})")
    out.append(f"| {step:,} | {rows:,} | " + " | ".join(cells) + " |")
  marks = "; ".join(f"{k} = {v:.3g}" for k, v in panel.marks.items())
  return out + ["", f"Marked in the plot: {marks}." if marks else "", ""]


def compute(curves: dict, total: int) -> list[str]:
  out = ["| run | seeds | steps reached (of the budget) | train wall | eval wall | process CPU |",
         "|---|---|---|---|---|---|"]
  for label, runs in curves.items():
    reached = [rows[-1]["step"] for rows in runs.values() if rows] or [0]
    tot = lambda k: sum(r.get(k, 0.0) for rows in runs.values() for r in rows)
    out.append(f"| {label} | {sum(1 for rows in runs.values() if rows)} | {min(reached):,}-{max(reached):,} of {total:,} | "
               f"{tot('train_s') / 60:.1f} min | {tot('eval_s') / 60:.1f} min | {tot('cpu_s') / 60:.1f} min |")
  return out


def measure_sweep(exp: registry.Experiment, sweep_dir: str) -> list[dict]:
  """The experiment's metric on each finished run of a `nextlat sweep` folder (one run per subfolder),
  measured as for the curves; cached per run and step in RUN/sweep_measure.json."""
  from nextlat_jax import config as config_lib
  from nextlat_jax.train import checkpoint
  out = []
  for name in sorted(os.listdir(sweep_dir)):
    run_dir = os.path.join(sweep_dir, name)
    ckpts = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpts):
      continue
    step = checkpoint.manager(ckpts, None, read_only=True).latest_step()
    config = config_lib.from_saved(checkpoint.saved_config(ckpts))
    if step is None or step < int(config.steps):
      continue  # unfinished: measured once it reaches its steps
    cache = os.path.join(run_dir, "sweep_measure.json")
    cached = json.load(open(cache)) if os.path.exists(cache) else {}
    if cached.get("step") != step:
      cached = {"step": step, **exp.measure(run_dir, config)}
      with open(cache, "w") as f:
        json.dump(cached, f)
    losses = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"ce"' in l]
    out.append({"run": name, "rows": step * int(config.batch_size), "train_ce": losses[-1]["ce"] if losses else None,
                **cached})
  return out


def sweep_table(rows: list[dict], sweep_dir: str) -> list[str]:
  if not rows:
    return [f"No finished run in `{sweep_dir}` yet.", ""]
  keys = [k for k in rows[0] if k not in ("run", "step", "rows", "train_ce")]
  out = [f"| run | steps | rows | last training CE | {' | '.join(keys)} |", "|" + "---|" * (4 + len(keys))]
  for r in rows:
    ce = "" if r["train_ce"] is None else f"{r['train_ce']:.3f}"
    out.append(f"| {r['run']} | {r['step']:,} | {r['rows']:,} | {ce} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
  return out + [""]


def write_report(exp: registry.Experiment, folder: str, seeds: int, total: int, out: str, smoke: bool,
                 sweep_dir: str | None = None) -> dict:
  """Writes OUT.md and OUT.png from the runs in `folder` (and, with `sweep_dir`, a table of that sweep's
  runs measured the same way); returns {label: {seed: rows}}."""
  curves = collect(exp, folder, seeds)
  png = out + ".png"
  plots.seed_curves([{"title": p.title, "ylabel": p.ylabel, "marks": p.marks,
                      "lines": {name: series(curves, label, key) for name, label, key in p.lines}}
                     for p in exp.panels], png)
  done = all(rows and rows[-1]["step"] >= total for runs in curves.values() for rows in runs.values())
  default = exp.default_steps(folder)
  steps_flag, steps_note = "", ""
  if total != default:  # --steps: the setting below states the experiment's own budget
    steps_flag = f" --steps={total}"
    steps_note = f" **Steps: {total:,} (--steps), not the setting's {default:,}.**"
  lines = [f"# {exp.title}", "",
           f"Written by `python experiments/curves.py --experiment={exp.name} --seeds={seeds}{steps_flag}"
           f"{' --smoke' if smoke else ''}` ({time.strftime('%Y-%m-%d %H:%M')}); runs in `{folder}`. "
           + ("Every run reached its budget." if done else
              "**Unfinished**: the same command continues every run from its checkpoint."), "",
           f"Setting: {exp.setting}" + (" (--smoke: a 1 x 16 model, plumbing only)" if smoke else "") + steps_note,
           "",
           f"![curves]({os.path.basename(png)})", "", "## Does the paper's effect appear?", "",
           *[line for e in exp.effects for line in (verdict(exp, curves, e), "")], "## Curves", ""]
  for panel in exp.panels:
    lines += table(exp, panel, curves)
  if sweep_dir:
    lines += [f"## Hyperparameter sweep (`nextlat sweep`, runs in `{sweep_dir}`)", "",
              "Each run measured as the curves are (the same held-out set and decoding).", ""]
    lines += sweep_table(measure_sweep(exp, sweep_dir), sweep_dir)
  lines += ["## Compute used", "", f"Machine: {machine()}.", ""] + compute(curves, total) + [""]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines))
  return curves
