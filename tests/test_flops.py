"""nextlat_jax.flops: the analytic FLOP model against hand arithmetic and against XLA's own count."""

import jax
import ml_collections
import pytest

from nextlat_jax import flops
from nextlat_jax.config import load_config_file
from nextlat_jax.config import base_config, validate
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import step as step_lib

from tests.conftest import CPU_FAST_COMPILE, REPO


def _config(name: str, horizon: int = 1, **model) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(dict(dict(vocab_size=32, d_model=8, n_layer=2, n_head=2, ffn_width=16), **model))
  c.dynamics.hidden = 16
  c.objective.update(name=name, horizon=horizon)
  c.data = ml_collections.ConfigDict(dict(eos_id=0))
  return c


def test_matmul_params_by_hand():
  # D=8, F=16, V=32, H=16: qkv 3·64, out 64, mlp_in 2·8·16, mlp_out 16·8; p_psi 2·8·16 + 16² + 16·8.
  p = flops.matmul_params(_config("gpt"))
  assert (p["layer_qkv"], p["layer_out"], p["layer_mlp_in"], p["layer_mlp_out"]) == (192, 64, 256, 128)
  assert p["layer"] == 640 and p["trunk"] == 1280 and p["head"] == 256 and p["dynamics"] == 640


def test_default_ffn_width_and_spec_counts():
  # Path-Star (METHOD.md §7): 12 layers, D=384 -> H_ff 1024; block 1,770,240 minus the 2 norms (768).
  c = base_config()
  c.model.update(vocab_size=106, d_model=384, n_layer=12, n_head=6)
  c.dynamics.hidden = 384
  p = flops.matmul_params(c)
  assert p["layer"] == 1_770_240 - 2 * 384
  assert p["dynamics"] == 590_592 - 2 * 384  # p_psi minus its 2D norm weight


def test_gpt_flops_by_hand():
  # B=3 rows of L=5 tokens; GPT feeds T=4 tokens per row.
  f = flops.train_flops_per_step(_config("gpt"), row_len=5, batch=3)
  assert f["trunk_tokens"] == 4
  assert f["trunk"] == 3 * 2 * 1280 * 4 * 3  # 92,160
  assert f["attention"] == 3 * 4 * 4 * 4 * 8 * 2 * 3  # 3 · 4·T²·D · layers · B = 9,216
  assert f["head"] == 3 * 2 * 256 * 4 * 3  # 18,432
  assert f["dynamics"] == 0 and f["kl_head"] == 0
  assert f["total"] == 92_160 + 9_216 + 18_432
  assert f["forward"] * 3 == f["total"]


def test_nextlat_flops_by_hand():
  # NextLat d=2 feeds T=L=5; dynamics over (L-1)+(L-2) = 7 positions per row, KL head over 3+2 = 5.
  f = flops.train_flops_per_step(_config("nextlat", horizon=2), row_len=5, batch=3)
  assert f["trunk_tokens"] == 5
  assert f["trunk"] == 6 * 1280 * 5 * 3  # 115,200
  assert f["attention"] == 12 * 5 * 5 * 8 * 2 * 3  # 14,400
  assert f["head"] == 6 * 256 * 4 * 3  # CE over L-1 positions: 18,432
  assert f["dynamics"] == 6 * 640 * 7 * 3  # 80,640
  assert f["kl_head"] == 4 * 256 * 5 * 3  # forward + backward-to-ĥ only: 15,360
  assert f["total"] == 115_200 + 14_400 + 18_432 + 80_640 + 15_360
  assert f["forward"] == (115_200 + 14_400 + 18_432) / 3 + 2 * 640 * 21 + 2 * 256 * 15


def _bench_config(arg=None):
  return load_config_file("bench_step", arg)


def test_bench_config_valid_and_extra_flops_about_20_percent():
  """The issue's model (6 x 384, V=4096, H_psi=768, 256-token rows): NextLat d=1 costs ~+20% FLOPs."""
  c = _bench_config()
  validate(c, 1)
  L, B = c.data.seq_len + 1, c.batch_size
  gpt = flops.train_flops_per_step(dict_with(c, name="gpt"), L, B)["total"]
  ratios = [flops.train_flops_per_step(dict_with(c, name="nextlat", horizon=d), L, B)["total"] / gpt
            for d in (1, 2, 8)]
  assert 1.15 < ratios[0] < 1.25 and ratios[0] < ratios[1] < ratios[2]


def dict_with(c, **objective):
  c = ml_collections.ConfigDict(c.to_dict())
  c.objective.update(objective)
  return c


def test_horizon_too_long_raises():
  with pytest.raises(ValueError, match="horizon"):
    flops.train_flops_per_step(_config("nextlat", horizon=4), row_len=5, batch=1)


@pytest.mark.parametrize("name,horizon", [("gpt", 1), ("nextlat", 1), ("nextlat", 3)])
def test_matches_xla_cost_analysis(name, horizon):
  """XLA's flop count of the compiled float32 train step is within 15% of the analytic one.

  Layers are unrolled (scan_layers=False) and the vocabulary losses unfused (vocab_chunk=0): XLA's cost
  analysis counts a while-loop body once, so with the scanned trunk it would see one layer instead of
  n_layer, and with the fused losses one chunk of positions and one rollout step's head term. The fused
  losses do the same matmuls (objectives/vocab_losses.py); the FLOP model counts the math, not the loop. XLA counts elementwise work too (norms,
  softmaxes, GELU, losses, AdamW), 1 flop per element op, so it sits a few percent above the matmul-only
  model (about +3-5% at this size); XLA's dot count is 2 flops per multiply-add, like ours.
  """
  c = _config(name, horizon, vocab_size=512, d_model=128, n_layer=2, n_head=4, ffn_width=0,
              scan_layers=False)
  B, L = 4, 65
  c.dynamics.hidden = 256
  c.objective.vocab_chunk = 0
  c.mesh.update(data=1, fsdp=1, tensor=1)
  validate(c, 1)
  mesh = make_mesh(c.mesh, jax.devices()[:1])
  setup = step_lib.build(c, mesh)
  compiled = setup.step.lower(setup.abstract_state, setup.abstract_batch(B, L), setup.abstract_rng()).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = flops.train_flops_per_step(c, L, B)["total"]
  assert 1.0 <= cost["flops"] / ours < 1.15, (cost["flops"], ours)


def test_bench_step_smoke(tmp_path, capsys):
  """The benchmark runs end to end on the tiny preset and reports consistent FLOPs, targets and the
  compiled memory of every variant."""
  import json

  from nextlat_jax.bench import step as bench_step
  c = _bench_config("smoke")
  c.bench.update(objectives=("nextlat", "jtp", "bst"), horizons=(1,), rounds=1, steps_per_round=1,
                 warmup_steps=1)
  res = bench_step.main(c, workdir=str(tmp_path))
  assert [v["variant"] for v in res["variants"]] == ["GPT", "NextLat d=1", "JTP d=1", "BST"]
  L, B = c.data.seq_len + 1, c.batch_size
  assert res["variants"][1]["flops"] == flops.train_flops_per_step(dict_with(c, horizon=1), L, B)["total"]
  assert res["variants"][2]["flops"] == flops.train_flops_per_step(dict_with(c, name="jtp", horizon=1), L, B)["total"]
  bst = flops.train_flops_per_step(dict_with(c, name="bst", bst_pair_fraction=0.1), L, B)
  assert res["variants"][3]["flops"] == bst["total"] and bst["pairs"] < 0.2 * L * L / 2
  assert res["variants"][3]["paper_time_ratio"] == pytest.approx(3.09 / 0.89)
  assert len(res["targets"]) == 2 and all(v["step_ms"] > 0 for v in res["variants"])
  saved = json.loads((tmp_path / "bench_step.json").read_text())
  assert saved["row_len"] == L
  table = capsys.readouterr().out
  assert "| compiled MiB |" in table
  for v in saved["variants"]:
    mem = v["memory_mib"]
    assert mem["total"] > 0 and mem["total"] == pytest.approx(v["memory_gib"] * 1024, abs=0.01), v["variant"]
    assert f"{mem['total']:,.1f} |" in next(line for line in table.splitlines() if line.startswith(f"| {v['variant']} |"))


def test_device_check_script_fits_the_batch_on_cpu(tmp_path):
  """launch/device_check.sh on the tiny preset: the batch is halved until the NextLat step's compiled
  memory fits the (pretend) device budget, and the timed variants use that batch."""
  import json
  import os
  import subprocess
  import sys
  # a fresh compilation cache: nothing carried over from another run (tests/conftest.py)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  out = subprocess.run(["bash", "launch/device_check.sh", str(tmp_path), "--config=configs/device_check.py:smoke"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads((tmp_path / "bench_step.json").read_text())
  fit = res["fit"]
  assert [f["batch_rows"] for f in fit] == [8 >> i for i in range(len(fit))]
  assert fit[-1]["gib"] <= fit[-1]["budget_gib"] < fit[0]["gib"]
  assert all(f["gib"] > f["budget_gib"] for f in fit[:-1])
  assert res["batch_rows"] == fit[-1]["batch_rows"]
  assert [v["variant"] for v in res["variants"]] == ["GPT", "NextLat d=1"]
  assert abs(res["variants"][1]["memory_gib"] - fit[-1]["gib"]) < 1e-6


def test_bench_variants_cover_objectives_horizons_and_remats():
  from nextlat_jax.bench import step as bench_step
  c = _bench_config()
  s = bench_step.bench_settings(c)
  labels = [label for label, _ in bench_step.variant_configs(c, s)]
  assert labels == ["GPT", *[f"{o} d={d}" for o in ("NextLat", "MTP", "JTP") for d in (1, 2, 8)], "BST"]
  s = dict(s, objectives=("nextlat",), horizons=(2,), remats=("none", "full"))
  vs = bench_step.variant_configs(c, s)
  assert [(l, v.objective.name, v.objective.horizon, v.model.remat) for l, v in vs] == [
      ("GPT [remat=none]", "gpt", 1, "none"), ("NextLat d=2 [remat=none]", "nextlat", 2, "none"),
      ("GPT [remat=full]", "gpt", 1, "full"), ("NextLat d=2 [remat=full]", "nextlat", 2, "full")]
  c.bench.remats = ("fastest",)
  with pytest.raises(ValueError, match="bench.remats='fastest'"):
    bench_step.bench_settings(c)
