"""Small-scale counterpart of the paper's Table 1 (Manhattan world model) on CPU: GPT and NextLat trained
on random walks over the generated 8x8 one-way street grid (configs/quickstart.py), evaluated with the
world-model metrics (nextlat_jax.eval.metrics.world_model) and effective rank, next to the paper's
numbers and the true world model. Writes experiments/results_world_model.md.

  python experiments/world_model.py [--steps=400] [--horizon=8] [--workdir=/tmp/nextlat_world_model]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import quickstart  # noqa: E402
from nextlat_jax.data.tasks import walks as walks_lib  # noqa: E402
from nextlat_jax.data.tasks.manhattan import heldout_mask  # noqa: E402
from nextlat_jax.eval import run as eval_run  # noqa: E402
from nextlat_jax.eval.metrics import world_model as wm  # noqa: E402
from nextlat_jax.train import metrics_writer, trainer  # noqa: E402

SETTINGS = dict(num_pairs=640, next_token_walks=500, compression_trials=50, detour_trials=100)  # CPU budget
PAPER = {  # Table 1 (d = 8): next-token, valid traj., compression, effective rank, detours (75%)
    "GPT (paper, 88M, Manhattan)": (100.0, 97.0, 0.65, 160.1, 85.0),
    "NextLat (paper, 88M, Manhattan)": (100.0, 98.7, 0.71, 52.7, 95.0),
    "True world model (paper)": (100.0, 100.0, 1.00, None, 100.0),
}


def config(objective: str, steps: int, horizon: int):
  c = quickstart.get_config(objective)
  c.steps = steps
  c.eval_every = steps
  c.checkpoint.update(every=steps, keep=1)
  c.model.update(d_model=64, n_layer=2, n_head=2)
  c.dynamics.hidden = 128
  c.objective.horizon = horizon
  c.optimizer.update(warmup_steps=min(50, steps // 10))
  return c


def oracle_row(data_cfg, settings: wm.Settings) -> dict:
  source = walks_lib.make_source(data_cfg, split="eval", seed=0)
  world = wm.World(source.graph, source.tokenizer,
                   lambda o, d: heldout_mask(o, d, source.split_seed, source.heldout_fraction), settings.max_hops)
  rng = np.random.default_rng([0, 1])
  walks = [source.walk_tokens(*source.sample_walk(rng)) for _ in range(settings.next_token_walks)]
  return wm.world_model_metrics(wm.OracleLM(world), world, walks, settings)


def fmt(x, spec):
  return "—" if x is None else format(x, spec)


def table(rows: dict) -> str:
  head = ("| Model | Next-token test ↑ | Valid traj. (reached end / legal) ↑ | Seq. compression "
          "(reference / vafa) ↑ | Eff. latent rank ↓ | Detour robustness 75% (legal / reached end) ↑ |\n"
          "|---|---|---|---|---|---|\n")
  lines = []
  for name, r in rows.items():
    if isinstance(r, tuple):
      nt, valid, comp, rank, det = r
      lines.append(f"| {name} | {fmt(nt, '.1f')}% | {fmt(valid, '.1f')}% | {fmt(comp, '.2f')} | "
                   f"{fmt(rank, '.1f')} | {fmt(det, '.1f')}% |")
      continue
    lines.append(
        f"| {name} | {r['next_token_test']:.1f}% | {r['valid_reached_end']:.1f}% / {r['valid_legal']:.1f}% | "
        f"{r['compression_reference']:.2f} / {r['compression_vafa']:.2f} | {fmt(r.get('erank'), '.1f')} | "
        f"{r['detour_random_valid_legal']:.1f}% / {r['detour_random_valid_reached_end']:.1f}% |")
  return head + "\n".join(lines) + "\n"


def comparison(gpt: dict, nextlat: dict, n: dict) -> str:
  """Per metric: the paper's direction (NextLat better) against ours, with two binomial standard errors."""
  lines = []
  for key, name, count, scale in (("next_token_test", "next-token test", "next_token_positions", 100),
                                  ("valid_reached_end", "valid trajectories (reached end)", "num_pairs", 100),
                                  ("valid_legal", "valid trajectories (legal)", "num_pairs", 100),
                                  ("compression_reference", "compression (reference)", "compression_trials", 1),
                                  ("compression_vafa", "compression (vafa)", "compression_trials", 1),
                                  ("detour_random_valid_legal", "detours (legal)", "detour_trials", 100),
                                  ("detour_random_valid_reached_end", "detours (reached end)", "detour_trials", 100),
                                  ("erank", "effective rank (lower is better)", None, None)):
    a, b = gpt[key], nextlat[key]
    if count is None:
      verdict = "NextLat lower, as in the paper" if b < a else "NextLat not lower, unlike the paper"
      lines.append(f"- {name}: GPT {a:.1f}, NextLat {b:.1f}: {verdict}.")
      continue
    k = gpt[count] if count in gpt else n[count]
    se = 2 * scale * np.sqrt(sum((x / scale) * (1 - x / scale) for x in (a, b)) / k)
    if abs(b - a) <= se:
      verdict = "no difference beyond two standard errors"
    else:
      verdict = "NextLat better, as in the paper" if b > a else "GPT better, unlike the paper"
    lines.append(f"- {name}: GPT {a:.3g}, NextLat {b:.3g} (2 SE ~ {se:.2g}, n = {k}): {verdict}.")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--horizon", type=int, default=8)
  parser.add_argument("--workdir", default="/tmp/nextlat_world_model")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results_world_model.md"))
  args = parser.parse_args()
  rows, info = {}, {}
  for objective in ("gpt", "nextlat"):
    workdir = os.path.join(args.workdir, objective)
    t0 = time.time()
    trained = not os.path.isdir(os.path.join(workdir, "checkpoints", str(args.steps)))
    if trained:
      trainer.train(config(objective, args.steps, args.horizon), workdir)
    t1 = time.time()
    res = eval_run.evaluate_task(workdir, args.steps, None, None, show_progress=False,
                                 options={"world_model": SETTINGS})
    t2 = time.time()
    final_eval_ce = metrics_writer.read_history(os.path.join(workdir, "metrics.jsonl"))["eval_ce"][-1][1]
    rows[f"{'GPT' if objective == 'gpt' else f'NextLat d={args.horizon}'} (ours, 0.1M, 8x8 grid)"] = {
        **res["street_grid"], "erank": res["rank"]["erank"]}
    info[objective] = dict(train_s=round(t1 - t0) if trained else "(checkpoint reused)", eval_s=round(t2 - t1),
                           eval_ce=final_eval_ce,
                           erank_mean=res["rank"]["erank_mean_over_batches"])
  data_cfg = config("gpt", args.steps, args.horizon).data
  rows["True world model (ours, oracle)"] = oracle_row(
      data_cfg, wm.settings_for(None, 256, 0, **SETTINGS))
  c = config("nextlat", args.steps, args.horizon)
  with open(args.out, "w") as f:
    f.write("# World model (Table 1) at CPU scale\n\n")
    f.write(f"Produced by `python experiments/world_model.py --steps={args.steps} --horizon={args.horizon}` "
            f"(seed 0).\n\n")
    f.write(table({**PAPER, **rows}))
    f.write(f"""
Setup (ours): random walks (3..30 moves) on the generated 8x8 one-way street grid (64 nodes, vocabulary
74), rows of {c.data.seq_len + 1} tokens, {c.model.n_layer} layers x {c.model.d_model} x {c.model.n_head} heads,
{args.steps} steps of batch {c.batch_size} (AdamW, cosine lr {c.optimizer.lr}), NextLat d = {args.horizon}
(lambda_next_h = lambda_KL = 1, p_psi hidden {c.dynamics.hidden}). Metrics as METRICS.md §1-3, §5, §6 with
{SETTINGS['num_pairs']} pairs (valid trajectories; the spec: 6,400), {SETTINGS['next_token_walks']} held-out
walks (next-token test), {SETTINGS['compression_trials']} compression trials of 30 suffixes (the spec: 100)
and {SETTINGS['detour_trials']} detour trials; effective rank of 256 held-out rows x 256 tokens (first
batch; D = {c.model.d_model}, so not comparable in size with the paper's D = 384).

Wall-clock training (with compilation) / evaluation time (s) on a shared 2-core CPU, held-out CE:
""")
    for objective, v in info.items():
      f.write(f"- {objective}: train {v['train_s']}, eval {v['eval_s']}, eval CE {v['eval_ce']:.4f}, "
              f"erank mean over 4 batches {v['erank_mean']:.1f}\n")
    names = list(rows)
    f.write("\nGPT vs NextLat here (the paper: NextLat better on every metric but the next-token test):\n")
    f.write(comparison(rows[names[0]], rows[names[1]], SETTINGS))
    if all(rows[n]["valid_reached_end"] < 10.0 for n in names[:2]):
      f.write("\nAt this budget neither model has learned to steer to the destination (greedy valid "
              "trajectories that end there: a few percent), while both have learned most legal moves "
              "(next-token test); NextLat's next-token CE still lags GPT's at equal steps. The paper's "
              "Table 1 is about models trained ~10^4 times longer; this run shows the pipeline "
              "end to end, not a reproduction.\n")
    f.write("\n" + NOTES)
  print(open(args.out).read())


NOTES = """Reading the table. The paper's numbers are for 88M-parameter models trained on 4.7B tokens of
Manhattan walks; ours are 0.1M-parameter models trained for a few minutes on a CPU on a 64-node grid, so
only the direction of the differences is comparable, and with one seed and a few hundred samples per
metric the sampling error of each percentage is several points. The true-world-model row is the oracle
of nextlat_jax.eval.metrics.world_model (shortest-path moves), which must score 100% / 1.00 by
construction: it checks the metric code, not a model.
"""


if __name__ == "__main__":
  main()
