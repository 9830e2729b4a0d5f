"""Sweep expansion: product / zip of overrides -> named runs -> `nextlat train` commands."""
import subprocess
import sys

import pytest

from nextlat_jax import sweep
from tests.conftest import REPO


def test_product_and_zip():
  assert sweep.zip_({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zip_({"a": [1], "b": [3, 4]})
  runs = sweep.product(sweep.zip_({"x.n": ["gpt", "nextlat"], "x.d": [1, 2]}), {"seed": [0, 1, 2]})
  assert len(runs) == 6
  assert runs[0] == {"x.n": "gpt", "x.d": 1, "seed": 0} and runs[-1] == {"x.n": "nextlat", "x.d": 2, "seed": 2}


def test_commands_of_the_example_sweep(tmp_path):
  cmds = sweep.commands("configs/quickstart.py", str(REPO / "configs/sweeps/objectives_quickstart.py"),
                        str(tmp_path), ["--config.steps=10"])
  names = [n for n, _ in cmds]
  assert names == [f"name={o},horizon={h},seed={s}" for o, h in (("gpt", 1), ("nextlat", 1), ("nextlat", 2),
                                                                  ("nextlat", 4)) for s in (0, 1)]
  name, argv = cmds[5]
  assert argv == ["nextlat", "train", "--config=configs/quickstart.py", f"--workdir={tmp_path}/{name}",
                  "--config.objective.name=nextlat", "--config.objective.horizon=2", "--config.seed=1",
                  "--config.steps=10"]


def test_cli_dry_run_prints_every_command(tmp_path):
  out = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "sweep", "--config=configs/quickstart.py",
                        "--sweep=configs/sweeps/objectives_quickstart.py", f"--workdir={tmp_path}", "--dry_run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 8 and all(l.startswith("nextlat train --config=configs/quickstart.py") for l in lines)
  assert not list(tmp_path.iterdir())  # a dry run launches nothing


def test_mfu_peak_table():
  import ml_collections

  from nextlat_jax.train import mfu

  class Dev:
    def __init__(self, kind):
      self.device_kind = kind

  cfg = ml_collections.ConfigDict({"peak_flops_per_device": 0.0})
  assert mfu.peak_flops_per_device(cfg, Dev("NVIDIA H200")) == 989e12
  assert mfu.peak_flops_per_device(cfg, Dev("TPU v5 lite")) == 197e12
  assert mfu.peak_flops_per_device(cfg, Dev("cpu")) is None
  cfg.peak_flops_per_device = 5e12
  assert mfu.peak_flops_per_device(cfg, Dev("cpu")) == 5e12
