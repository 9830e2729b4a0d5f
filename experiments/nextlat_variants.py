"""NextLat ablation switches, dynamics kinds and Muon on the HMM belief-state task, one seed each, at CPU scale.

Every run goes through the real trainer and evaluation via the helpers of experiments/belief_state.py
(configs/hmm_belief.py resized; `nextlat eval`'s belief metric + effective rank). The variants are the
switches of docs/research.md, each changed alone from the paper default; GPT is the reference row. One
Markdown table is written, every number measured here; the seed spread it is read against comes from
experiments/belief_state.md (parsed, not typed).

  python experiments/nextlat_variants.py                      # defaults: 15 min measured on 2 shared cores
  python experiments/nextlat_variants.py --only=default,gru --steps=100   # a quicker look
  python experiments/nextlat_variants.py --from_json=/tmp/nextlat_variants/results.json   # rewrite the .md only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import belief_state as bs  # noqa: E402  (experiments/belief_state.py: configs and the per-run helpers)
from nextlat_jax import info  # noqa: E402
from nextlat_jax.bench.step import machine_info  # noqa: E402
from nextlat_jax.eval import run as eval_run  # noqa: E402
from nextlat_jax.train import metrics_writer, preflight, trainer  # noqa: E402

# (name, label, configs/hmm_belief.py argument, dotted overrides); the order is the drop order (from the end).
VARIANTS = (
    ("gpt", "GPT (reference)", "gpt", {}),
    ("default", "NextLat, paper default (mlp, AdamW)", "nextlat", {}),
    ("no_sg", "next_h_stop_gradient=False", "nextlat", {"objective.next_h_stop_gradient": False}),
    ("head", "kl_frozen_head=False", "nextlat", {"objective.kl_frozen_head": False}),
    ("tok_ce", "token_loss=ce", "nextlat", {"objective.token_loss": "ce"}),
    ("tok_none", "token_loss=none", "nextlat", {"objective.token_loss": "none"}),
    ("mse", "next_h_loss=mse", "nextlat", {"objective.next_h_loss": "mse"}),
    ("cosine", "next_h_loss=cosine", "nextlat", {"objective.next_h_loss": "cosine"}),
    ("chain", "eos_mask=chain", "nextlat", {"objective.eos_mask": "chain"}),
    ("resmlp", "dynamics.kind=resmlp", "nextlat", {"dynamics.kind": "resmlp"}),
    ("gru", "dynamics.kind=gru", "nextlat", {"dynamics.kind": "gru"}),
    ("attn", "dynamics.kind=attn", "nextlat", {"dynamics.kind": "attn"}),
    ("muon", "optimizer=muon (Muon + AdamW)", "nextlat,muon", {}),
)
METRICS = (("belief_r2", ".3f"), ("next_symbol_kl", ".4f"), ("erank", ".2f"))
REF_ROWS = {"gpt": "GPT, AdamW", "default": "NextLat d=1, AdamW",  # our name -> label in experiments/belief_state.md
            "muon": "NextLat d=1, Muon + AdamW"}
REF_COLS = ("belief_r2", "next_symbol_kl", "next_symbol_ce", "erank", "numerical_rank")


def variant_config(arg: str, overrides: dict, args: argparse.Namespace):
  c = bs.experiment_config(arg, args.seed, args)
  c.log_every = 10
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def train_ce_tail(workdir: str, steps: int, window: int) -> tuple[float, int]:
  """Mean of the logged per-step train CE over the last `window` steps (and how many logs it averages)."""
  history = metrics_writer.read_history(os.path.join(workdir, "metrics.jsonl"))
  ces = [v for step, v in history["ce"] if step > steps - window]
  return sum(ces) / len(ces), len(ces)


def run_variant(name: str, arg: str, overrides: dict, args: argparse.Namespace) -> dict:
  workdir = os.path.join(args.workdir, name)
  shutil.rmtree(workdir, ignore_errors=True)
  config = variant_config(arg, overrides, args)
  counts = info.param_counts(preflight.resolve(config)[0])["training"]
  t0 = time.time()
  last = trainer.train(config, workdir)
  t1 = time.time()
  results = eval_run.evaluate_task(workdir, num_samples=args.belief_rows, rank_batches=1, show_progress=False)
  tail, n_logs = train_ce_tail(workdir, args.steps, args.ce_window)
  return {**results["hmm"], "train_ce_last": float(last["ce"]), "train_ce_tail": tail, "train_ce_logs": n_logs,
          "dynamics_params": counts.get("dynamics", 0),
          "train_s": t1 - t0, "eval_s": time.time() - t1}


def reference_spread(path: str) -> dict:
  """{"gpt"|"default"|"muon": {metric: (mean, sample std)}, "steps", "batch_size"} from the table of
  experiments/belief_state.md ({} when it is missing or its format changed)."""
  out = {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    text = f.read()
  for key, label in REF_ROWS.items():
    m = re.search(r"^\| " + re.escape(label) + r" \|(.*)\|$", text, re.M)
    if m is None:
      continue
    cells = [c.strip() for c in m.group(1).split("|")]
    pairs = [re.fullmatch(r"([-+0-9.e]+) ± ([-+0-9.e]+)", c) for c in cells]
    if len(cells) == len(REF_COLS) and all(pairs):
      out[key] = {col: (float(p.group(1)), float(p.group(2))) for col, p in zip(REF_COLS, pairs)}
  m = re.search(r"(\d+) steps x (\d+) rows", text)
  if m is None or "default" not in out:
    return {}
  out["steps"], out["batch_size"] = int(m.group(1)), int(m.group(2))
  m = re.search(r"seeds ([0-9, ]+) \(mean", text)
  out["seeds"] = m.group(1).strip() if m else "?"
  return out


def diff_std(spread: dict, name: str, key: str) -> float | None:
  """The std of (row `name` - default) for one seed each: sqrt(s_row^2 + s_default^2), s_row the row's own
  seed spread in experiments/belief_state.md where it has one, else the default's."""
  if "default" not in spread:
    return None
  s_def = spread["default"][key][1]
  return math.hypot(spread.get(name, spread["default"])[key][1], s_def)


def verdict(diff: float, std: float | None) -> str:
  """'beyond' when |diff| > 2 std, else 'within'; '' without a std."""
  if std is None:
    return ""
  return "beyond" if abs(diff) > 2 * std else "within"


def header(res: dict, first: dict) -> list[str]:
  a, m = argparse.Namespace(**res["args"]), res["machine"]
  return [
      "# NextLat variants on the HMM belief-state task at CPU scale (one seed)",
      "",
      (f"Written by `python experiments/nextlat_variants.py` ({res['date']}); whole run {res['wall_s'] / 60:.1f} "
       f"min wall. Machine: {m['cpu']}, {m['nproc']} cores (shared with other jobs), jax {m['jax']} on "
       f"{m['backend']} (runs on 1 device)."),
      "",
      (f"Task: `configs/hmm_belief.py` ({first['n_states']} hidden states, {first['n_symbols']} symbols, "
       f"{first['positions_per_row']} symbols per row). Every run: seed {a.seed} (model init and train rows; the "
       f"eval rows depend on data_seed only), {a.steps} steps x {a.batch_size} rows, {a.n_layer} layers x "
       f"{a.d_model} (4 heads), p_psi width {2 * a.d_model}, horizon d={a.horizon}, lambda_next_h = lambda_KL = 1, "
       f"AdamW lr {a.lr} (20 warm-up steps, constant), weight decay 0.01, clip 1; Muon lr {a.muon_lr} (other "
       "`optimizer.muon_*` at their defaults). Each NextLat "
       "row changes one key from the paper default (docs/research.md); the dynamics kinds use their default "
       "`dynamics.layers` = 2 (resmlp) / `dynamics.window` = 4 (attn)."),
      "",
      (f"Metrics (`nextlat_jax.eval.metrics.belief`) on {first['num_rows_fit'] + first['num_rows_test']} held-out "
       f"rows: belief R^2 of a ridge probe h_t -> P(z_t | x_1..x_t) fitted on {first['num_rows_fit']} rows, scored "
       f"on the other {first['num_rows_test']}; KL(true next-symbol law || model) in nats; held-out CE on the "
       f"scored rows (exact HMM: {first['next_symbol_ce_exact']:.4f}); effective / numerical rank of h "
       f"(D = {first['dim']}). Train CE: the next-token CE of the training batches logged in the last "
       f"{a.ce_window} steps (every 10th step: {first['train_ce_logs']} batches of {a.batch_size} rows), and of "
       "the last step's batch alone. p_psi params: the dynamics parameter count; train s: wall seconds of "
       "training including compilation, on shared cores (indicative only)."),
      "",
  ]


def table(res: dict, spread: dict) -> str:
  rows = res["rows"]
  first = next(iter(rows.values()))
  lines = header(res, first) + [
      "| Variant | belief R^2 | next-symbol KL | held-out CE | train CE (last steps) | train CE (last step) | "
      "erank | num. rank | p_psi params | train s |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows.values():
    lines.append(f"| {r['label']} | {r['belief_r2']:.3f} | {r['next_symbol_kl']:.4f} | {r['next_symbol_ce']:.4f} | "
                 f"{r['train_ce_tail']:.4f} | {r['train_ce_last']:.4f} | {r['erank']:.2f} | "
                 f"{r['numerical_rank']:.0f} | {r['dynamics_params']:,} | {r['train_s']:.0f} |")
  if res["dropped"]:
    lines += ["", f"Not run (time budget; dropped from the end of the list): {', '.join(res['dropped'])}."]
  return "\n".join(lines + [""] + reading(res, spread)) + "\n"


def reading(res: dict, spread: dict) -> list[str]:
  """The differences from the paper default, marked against the seed spread of experiments/belief_state.md."""
  rows, a = res["rows"], argparse.Namespace(**res["args"])
  base, ref = rows.get("default"), spread.get("default")
  lines = ["## Reading", ""]
  if base is None:
    return lines + ["No paper-default row was run: no differences."]
  same = spread.get("steps") == a.steps and spread.get("batch_size") == a.batch_size
  if ref:
    lines += [(
        f"Yardstick: the sample stds s over seeds {spread['seeds']} in experiments/belief_state.md "
        f"({spread['steps']} steps x {spread['batch_size']} rows, " + ("the same size as here" if same else
        "**not** the size used here") + "; parsed from that file): NextLat d=1 AdamW " +
        ", ".join(f"{k} {format(ref[k][1], f)}" for k, f in METRICS) + "; " +
        "; ".join(f"{rows[n]['label'] if n in rows else n} " + ", ".join(
            f"{k} {format(spread[n][k][1], f)}" for k, f in METRICS) for n in spread if n in ("gpt", "muon")) +
        ". A row minus the default (one seed each) has std sqrt(s_row^2 + s_default^2), with s_row the row's "
        "own spread there (GPT, Muon) or else the default's (every other variant: an assumption); a "
        "difference is marked 'beyond' when it exceeds twice that, else 'within'. An s from two seeds is "
        "itself very uncertain, so 'beyond' is a hint, not a test, and 'within' means this experiment cannot "
        "tell the row from the default."), ""]
  else:
    lines += ["No seed spread found in experiments/belief_state.md: the differences below are unmarked.", ""]
  lines += ["Each row minus the paper default:", ""]
  beyond: dict[str, list[str]] = {k: [] for k, _ in METRICS}
  for name, r in rows.items():
    if name == "default":
      continue
    parts = []
    for key, fmt in METRICS:
      diff = r[key] - base[key]
      word = verdict(diff, diff_std(spread, name, key))
      parts.append(f"{key} {format(diff, '+' + fmt)}" + (f" ({word})" if word else ""))
      if word == "beyond" and name != "gpt":
        beyond[key].append(f"{r['label']} ({format(diff, '+' + fmt)})")
    lines.append(f"- {r['label']}: " + "; ".join(parts) + ".")
  lines += ["", "Summary of the NextLat variants (GPT excluded):", ""]
  for key, _ in METRICS:
    lines.append(f"- {key}: " + ("; ".join(beyond[key]) if beyond[key] else "no variant") +
                 (" beyond the yardstick." if beyond[key] else " is beyond the yardstick.") if ref else
                 f"- {key}: no yardstick.")
  if ref:
    better = [r["label"] for n, r in rows.items() if n != "gpt" and
              verdict(r["belief_r2"] - base["belief_r2"], diff_std(spread, n, "belief_r2")) == "beyond" and
              verdict(r["next_symbol_kl"] - base["next_symbol_kl"], diff_std(spread, n, "next_symbol_kl")) ==
              "beyond" and r["belief_r2"] > base["belief_r2"] and r["next_symbol_kl"] < base["next_symbol_kl"]]
    worse = [r["label"] for n, r in rows.items() if n != "gpt" and
             verdict(r["belief_r2"] - base["belief_r2"], diff_std(spread, n, "belief_r2")) == "beyond" and
             verdict(r["next_symbol_kl"] - base["next_symbol_kl"], diff_std(spread, n, "next_symbol_kl")) ==
             "beyond" and r["belief_r2"] < base["belief_r2"] and r["next_symbol_kl"] > base["next_symbol_kl"]]
    lines += ["- Higher belief R^2 and lower KL than the default, both beyond the yardstick: " +
              (", ".join(better) or "none") + ".",
              "- Lower belief R^2 and higher KL, both beyond: " + (", ".join(worse) or "none") + "."]
  lines += ["", "Other observations:", ""]
  repeats = []
  for n in ("gpt", "default", "muon"):
    if n in rows and n in spread and a.seed == 0 and same:
      ok = all(abs(rows[n][k] - spread[n][k][0]) <= spread[n][k][1] + 10 ** -int(f[1]) for k, f in METRICS)
      repeats.append(f"{rows[n]['label']} ({'inside' if ok else 'OUTSIDE'} mean ± s there)")
  if repeats:
    lines.append("- Same config and seed as seed 0 of experiments/belief_state.md, so these rows repeat runs "
                 "averaged there: " + "; ".join(repeats) + ".")
  chain = rows.get("chain")
  if chain is not None:
    equal = all(chain[k] == base[k] for k in ("belief_r2", "next_symbol_kl", "erank", "train_ce_tail"))
    lines += [(
        "- eos_mask=chain: " + ("identical to the default in every metric (bit for bit), as expected" if equal
        else "differs from the default, which is unexpected") + ": every HMM row is [EOS, x_1..x_T] with its "
        "only EOS at column 0, which the dynamics never consumes, so the 'chain' and 'transition' masks "
        "coincide at any horizon. This row only checks that the switch is a no-op here; the HMM task cannot "
        "test it.")]
  gpt = rows.get("gpt")
  if gpt is not None:
    lower = [r["label"] for n, r in rows.items() if n != "gpt" and r["erank"] < gpt["erank"]]
    seeds = "" if not ref or "gpt" not in spread else (f" (experiments/belief_state.md, seeds {spread['seeds']}: GPT {spread['gpt']['erank'][0]:.2f} ± "
                                f"{spread['gpt']['erank'][1]:.2f}, NextLat {ref['erank'][0]:.2f} ± {ref['erank'][1]:.2f})")
    lines.append(f"- Effective rank of h: GPT {gpt['erank']:.2f}; {len(lower)} of {len(rows) - 1} NextLat rows are "
                 f"below it{seeds}.")
  lines += [
      (f"- One seed, {a.n_layer}-layer width-{a.d_model} models, one budget: a variant marked 'within' may still differ at scale, "
       "and one marked 'beyond' may not survive more seeds. The dynamics kinds also differ in p_psi size "
       "(column above), so a kind's row mixes its family with its capacity."),
      (f"- Train CE from a few {a.batch_size}-row batches is noisy (compare its two columns); the held-out CE "
       f"and KL, on the same {base['num_rows_test']} scored rows for every run, compare the next-token fit "
       "better."),
      ("- A linear probe measures whether the belief is linearly decodable from h, not whether the model "
       "uses it. Muon's settings are untuned defaults."),
  ]
  return lines


def reference_args(args: argparse.Namespace) -> None:
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  known = [v[0] for v in VARIANTS]
  for n in names:
    if n not in known:
      raise ValueError(f"--only: unknown variant {n!r}; expected some of {known}")
  args.only = names


def run_all(args: argparse.Namespace) -> dict:
  chosen = [v for v in VARIANTS if not args.only or v[0] in args.only]
  os.makedirs(args.workdir, exist_ok=True)
  res = {"args": {k: v for k, v in vars(args).items() if k not in ("only", "from_json")},
         "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "rows": {}, "dropped": [], "wall_s": 0.0}
  t0, rows = time.time(), res["rows"]
  for i, (name, label, arg, overrides) in enumerate(chosen):
    elapsed = time.time() - t0
    if rows and elapsed + elapsed / len(rows) > args.budget_min * 60:
      res["dropped"] = [v[1] for v in chosen[i:]]
      print(f"budget: {elapsed / 60:.1f} min used, dropping {res['dropped']}", flush=True)
      break
    rows[name] = {"label": label, **run_variant(name, arg, overrides, args)}
    r = rows[name]
    print(f"[{i + 1}/{len(chosen)}] {name}: train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s; belief_r2 "
          f"{r['belief_r2']:.3f} kl {r['next_symbol_kl']:.4f} erank {r['erank']:.2f} train_ce "
          f"{r['train_ce_tail']:.4f} ({(time.time() - t0) / 60:.1f} min)", flush=True)
    res["wall_s"] = time.time() - t0
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
      json.dump(res, f, indent=1, default=float)
  return res


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bs.add_size_args(p)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--belief_rows", type=int, default=1024)
  p.add_argument("--ce_window", type=int, default=50, help="train CE: mean of the logged steps in the last N")
  p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  p.add_argument("--budget_min", type=float, default=28.0, help="start no variant expected to end past this")
  p.add_argument("--workdir", default="/tmp/nextlat_variants")
  p.add_argument("--from_json", default="", help="rewrite the .md from a saved results.json; train nothing")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "nextlat_variants.md"))
  args = p.parse_args()
  reference_args(args)
  if args.from_json:
    with open(args.from_json) as f:
      res = json.load(f)
  else:
    res = run_all(args)
  text = table(res, reference_spread(os.path.join(REPO, "experiments", "belief_state.md")))
  with open(args.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
