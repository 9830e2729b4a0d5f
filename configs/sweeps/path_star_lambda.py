"""Hyperparameter sanity for NextLat on Path-Star G_{2,5} (issue: NextLat trails GPT there at small
budgets): lambda_KL in {0.1, 1} x lr in {5e-4 (the paper's), 1e-3}: 4 runs. The model size and budget
come as extra flags, the same as the `path_star` curves (experiments/curve_experiments.py):

  nextlat sweep --config=configs/path_star.py:nextlat,g2_5 --sweep=configs/sweeps/path_star_lambda.py \
      --workdir=runs/sweep_path_star --config.model.d_model=128 --config.model.n_layer=4 --config.model.n_head=4 \
      --config.dynamics.hidden=128 --config.steps=1000 --config.batch_size=64 --config.eval_every=0
  python experiments/curves.py --experiment=path_star --workdir=runs/curves --sweep_dir=runs/sweep_path_star

The last command tables every finished run in experiments/results_path_star.md, measured as the curves are.
"""
from nextlat_jax.sweep import product


def get_sweep():
  return product({"objective.lambda_kl": [0.1, 1.0]}, {"optimizer.lr": [5e-4, 1e-3]})
