"""GPT vs NextLat d=1,2,4 on the quickstart data, two seeds: 8 runs.

  nextlat sweep --config=configs/quickstart.py --sweep=configs/sweeps/objectives_quickstart.py \
      --workdir=runs/sweep --dry_run
"""
from nextlat_jax.sweep import product, zip_


def get_sweep():
  objectives = zip_({"objective.name": ["gpt", "nextlat", "nextlat", "nextlat"],
                     "objective.horizon": [1, 1, 2, 4]})
  return product(objectives, {"seed": [0, 1]})
