"""Sweep expansion: product / zip of overrides -> named runs -> `nextlat train` commands."""
import re
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


def _sweep(tmp_path, runs: list[dict], *flags):
  (tmp_path / "s.py").write_text(f"def get_sweep():\n  return {runs!r}\n")
  return subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "sweep", "--config=configs/quickstart.py",
                         f"--sweep={tmp_path / 's.py'}", f"--workdir={tmp_path / 'runs'}", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad, expected", [
    ({"model.d_model": 30}, r"config error: model\.d_model=30: must be divisible by model\.n_head=\d+ \(in sweep run d_model=30\)"),
    ({"modle.n_layer": 2}, r"config error: sweep run n_layer=2=\{'modle\.n_layer': 2\}: does not fit the config"),
])
def test_a_bad_run_stops_the_sweep_before_any_run_starts(tmp_path, bad, expected):
  out = _sweep(tmp_path, [{"model.n_layer": 1}, bad])
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and re.match(expected, lines[0]), out.stderr[-2000:]
  assert out.stdout == "" and not (tmp_path / "runs").exists()  # nothing launched, nothing written


def test_a_failing_run_stops_the_sweep_in_one_line(tmp_path):
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "n_layer=1").write_text("a file where the run's workdir goes")
  out = _sweep(tmp_path, [{"model.n_layer": 1}, {"model.n_layer": 2}], "--config.steps=1")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == ("sweep: run n_layer=1 exited with code 2; 0 of 2 runs done, "
                                                 "the other 1 not started")
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["n_layer=1"]


def test_path_star_lambda_sweep_runs_validate():
  """configs/sweeps/path_star_lambda.py with the flags its docstring gives: 4 runs, each a valid config."""
  from nextlat_jax.config import load_config_file
  c = load_config_file("path_star", "nextlat,g2_5")
  c.model.update(d_model=128, n_layer=4, n_head=4)
  c.dynamics.hidden = 128
  runs = sweep.load_sweep(str(REPO / "configs/sweeps/path_star_lambda.py"))
  assert [(r["objective.lambda_kl"], r["optimizer.lr"]) for r in runs] == [(0.1, 5e-4), (0.1, 1e-3), (1.0, 5e-4), (1.0, 1e-3)]
  sweep.check_runs(c, [(sweep.run_name(r), r) for r in runs], 1)
  with pytest.raises(ValueError, match=r"model\.d_model=128: must be divisible by model\.n_head=6"):
    c.model.n_head = 6
    sweep.check_runs(c, [(sweep.run_name(r), r) for r in runs], 1)
