"""experiments/curves.py: runs advance round-robin from their checkpoints (a rerun continues, a finished
curve is not retrained), the report's mean +- std and its call on the paper's effect."""
import json
import pathlib

import pytest

from experiments import curve_experiments as registry
from experiments import curve_report, curves
from nextlat_jax.errors import ConfigError
from nextlat_jax.eval import plots


def test_mean_std_over_the_steps_every_seed_reached():
  xs, mean, std = plots.mean_std({0: [(1, 1.0), (2, 3.0)], 1: [(1, 3.0), (2, 5.0), (3, 9.0)]})
  assert xs == [1, 2] and mean == [2.0, 4.0] and std == pytest.approx([2 ** 0.5] * 2)  # sample std


def test_curve_axes_start_at_zero_rows(tmp_path: pathlib.Path, monkeypatch):
  figures = []
  monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
  panel = {"title": "t", "ylabel": "exact (%)", "lines": {"GPT": {0: [(6400, 10.0)], 1: [(6400, 12.0)]}},
           "marks": {"chance": 50.0}}
  plots.seed_curves([panel], str(tmp_path / "c.png"))
  assert figures[0].axes[0].get_xlim()[0] == 0  # one evaluation in: still anchored at 0 rows


def _curves(better: list[float], other: list[float]) -> dict:
  rows = lambda values: {s: [{"step": 1, "rows": 8, "exact": v}] for s, v in enumerate(values)}
  return {"gpt": rows(other), "nextlat": rows(better), "mtp": {}}


@pytest.mark.parametrize("better,other,call", [
    ([90.0, 92.0, 91.0], [50.0, 49.0, 51.0], "The paper's effect appears"),
    ([50.0, 52.0, 48.0], [50.0, 49.0, 51.0], "does not appear"),
    ([30.0, 31.0, 29.0], [50.0, 49.0, 51.0], "opposite of the paper's effect"),
    ([90.0], [50.0], "no call is made"),
])
def test_verdict(better, other, call):
  assert call in curve_report.verdict(registry.PATH_STAR, _curves(better, other))


@pytest.mark.parametrize("nextlat,gpt,call", [
    ([0.381, 0.379, 0.380], [0.380, 0.381, 0.379], "The paper's picture appears"),
    ([0.50, 0.51, 0.52], [0.380, 0.381, 0.379], "NextLat is measured worse"),
])
def test_verdict_of_a_no_worse_claim(nextlat, gpt, call):
  rows = lambda values: {s: [{"step": 1, "rows": 8, "eval_ce": v}] for s, v in enumerate(values)}
  assert call in curve_report.verdict(registry.LM, {"gpt": rows(gpt), "nextlat": rows(nextlat)})


def test_each_claim_is_called_on_its_own():
  """Street grid: compact latents (erank) and validity no worse are two claims; one can hold, the other not."""
  rows = lambda pairs: {s: [{"step": 1, "rows": 16, "valid": v, "erank": r}] for s, (v, r) in enumerate(pairs)}
  curves = {"gpt": rows([(63.0, 30.0), (60.0, 30.1), (66.0, 29.9)]),
            "nextlat": rows([(37.0, 22.5), (40.0, 22.6), (35.0, 22.4)])}
  calls = [curve_report.verdict(registry.WORLD, curves, e) for e in registry.WORLD.effects]
  assert "more compact" in calls[0] and "The paper's effect appears" in calls[0]
  assert "as valid" in calls[1] and "NextLat is measured worse" in calls[1]


def test_runs_continue_from_their_checkpoints(tmp_path: pathlib.Path):
  exp, folder = registry.PATH_STAR, tmp_path / "ps"
  run = lambda steps, runs=("gpt",): curves.run_experiment(exp, str(folder), 2, 1.0, smoke=True, steps=steps,
                                                          eval_every=2, runs=list(runs))
  with pytest.raises(ConfigError, match="--runs='bogus': unknown"):
    run(2, runs=["bogus"])
  run(2)
  result = run(4)  # continues both seeds from step 2
  for seed in (0, 1):
    rows = result["gpt"][seed]
    assert [r["step"] for r in rows] == [2, 4] and [r["rows"] for r in rows] == [16, 32]
    assert all(0.0 <= r["exact"] <= 100.0 for r in rows)
    metrics = [json.loads(line) for line in (folder / "gpt" / f"seed{seed}" / "metrics.jsonl").open()]
    assert [m["info"]["session"]["start_step"] for m in metrics if "session" in m.get("info", {})] == [0, 2]
  before = (folder / "gpt" / "seed0" / "curve.jsonl").read_text()
  run(4)  # nothing left to train
  assert (folder / "gpt" / "seed0" / "curve.jsonl").read_text() == before
  report = (folder / "results_path_star.md").read_text()
  assert "| 4 | 32 | " in report and "(n=2)" in report and "No measurement of both lines yet." in report
  assert "--seeds=2 --steps=4 --smoke`" in report and "**Steps: 4 (--steps), not the setting's 1,000.**" in report
  assert (folder / "results_path_star.png").stat().st_size > 10_000
  # A `nextlat sweep` folder is a folder of run workdirs: the seeds' folders stand in for one here.
  swept = curve_report.measure_sweep(exp, str(folder / "gpt"))
  assert [(r["run"], r["step"], r["rows"]) for r in swept] == [("seed0", 4, 32), ("seed1", 4, 32)]
  assert swept[0]["exact"] == result["gpt"][0][-1]["exact"]  # measured as the curve is
  assert (folder / "gpt" / "seed0" / "sweep_measure.json").exists()
  curve_report.write_report(exp, str(folder), 2, 4, str(folder / "with_sweep"), True, str(folder / "gpt"))
  table = (folder / "with_sweep.md").read_text().split("## Hyperparameter sweep")[1]
  assert "| run | steps | rows | last training CE | exact | token2 |\n|---|---|---|---|---|---|\n| seed0 | 4 | 32 |" in table


def test_every_experiment_config_resolves(tmp_path: pathlib.Path):
  """Each run of each experiment passes the config checks (the LM runs on a small prepared story corpus)."""
  from experiments import stories
  from nextlat_jax.data import prepare
  from nextlat_jax.train import preflight
  corpus = stories.write_corpus(str(tmp_path / "stories.jsonl"), 1500)
  prepare.prepare(corpus, str(tmp_path / "data"), seq_len=128, tokenizer="bpe", train_bpe=300, progress=False)
  for exp in registry.EXPERIMENTS.values():
    assert exp.eval_every > 0
    for label, make in exp.runs.items():
      config = make(1, str(tmp_path))
      assert config.steps % exp.eval_every == 0 and config.seed >= 1, (exp.name, label)
      resolved, _ = preflight.resolve(config)
      assert resolved.objective.name == label.split("_")[0] or exp.name == "a5", (exp.name, label)
      for panel in exp.panels:
        assert {run for _, run, _ in panel.lines} <= set(exp.runs)
