"""metrics.jsonl across training sessions: each session's marker row (start step, time, config hash),
read_history's latest-row-wins curves (a resumed run reads and plots as one curve), and y axes of
constant plots without negative ticks."""
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np
import pytest

from nextlat_jax.eval import plots
from nextlat_jax.train import metrics_writer
from nextlat_jax.train.metrics_writer import MetricsWriter, config_hash, read_history

CONFIG = {"model": {"d_model": 32, "n_layer": 1}, "seed": 0, "steps": 15}


def _session(workdir: pathlib.Path, start: int, stop: int, offset: float) -> None:
  """One training session's rows as the trainer writes them: the marker, then loss = offset + step."""
  writer = MetricsWriter(str(workdir), enabled=True, total_steps=stop, initial_step=start)
  writer.write_static(step=start, memory={"total": 1.0}, session=dict(time=1000.0 + start))
  for step in range(start + 1, stop + 1):
    writer.write(step, {"loss": offset + step, "kl": 0.0})
  writer.write(stop, {"eval_loss": offset + stop + 0.5})
  writer.close()


@pytest.fixture
def resumed(tmp_path: pathlib.Path) -> pathlib.Path:
  """Steps 1..10 (loss = step), then a session resumed from step 5: steps 6..15 (loss = 100 + step)."""
  (tmp_path / "config.json").write_text(json.dumps(CONFIG, indent=2))
  _session(tmp_path, 0, 10, 0.0)
  _session(tmp_path, 5, 15, 100.0)
  return tmp_path / "metrics.jsonl"


def test_each_session_writes_a_marker_with_the_config_hash(resumed: pathlib.Path):
  rows = metrics_writer.read_rows(str(resumed))
  sessions = [r["info"]["session"] for r in rows if "info" in r]
  assert [s["start_step"] for s in sessions] == [0, 5] and [s["time"] for s in sessions] == [1000.0, 1005.0]
  expected = config_hash(json.dumps(CONFIG, indent=2))
  assert [s["config_hash"] for s in sessions] == [expected, expected]
  # stable: key order and whitespace do not matter, a value does
  assert config_hash(json.dumps({"steps": 15, "seed": 0, "model": {"n_layer": 1, "d_model": 32}})) == expected
  assert config_hash(json.dumps({**CONFIG, "seed": 1})) != expected and len(expected) == 16


def test_a_resumed_run_reads_as_one_curve_with_the_later_sessions_values(resumed: pathlib.Path):
  history = read_history(str(resumed))
  assert history["loss"] == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 16)]
  assert history["eval_loss"] == [(15, 115.5)]  # the first session's step-10 eval was redone (dropped)
  assert "info" not in history and "step" not in history


def test_latest_row_wins_and_a_session_drops_the_steps_it_redoes(tmp_path: pathlib.Path):
  rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0, "note": "x"},
          {"step": 2, "loss": 5.0, "nan": float("nan")},  # no marker: the later row of step 2 counts
          {"step": 1, "info": {"session": {"start_step": 1, "time": 0.0}}},  # resumed from 1, killed at 2:
          {"step": 2, "loss": 7.0}]  # step 3 of the abandoned session is gone
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn tail
  assert read_history(str(path)) == {"loss": [(1, 3.0), (2, 7.0)]}


def _captured_figures(monkeypatch) -> list:
  figs = []
  real_save = plots._save
  monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), real_save(fig, path))[1])
  return figs


def test_training_curves_of_a_resumed_run_draw_no_line_back(resumed: pathlib.Path, tmp_path: pathlib.Path,
                                                            monkeypatch):
  figs = _captured_figures(monkeypatch)
  png = plots.training_curves(str(resumed), str(tmp_path / "curves.png"))
  assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  panels = {ax.get_title(): ax for ax in figs[0].axes if ax.get_title()}
  loss = {line.get_label(): line for line in panels["loss"].lines}
  np.testing.assert_array_equal(loss["loss"].get_xdata(), np.arange(1, 16))  # steps only go forward
  np.testing.assert_array_equal(loss["loss"].get_ydata(), [*range(1, 6), *(100 + s for s in range(6, 16))])
  lo, hi = panels["kl"].get_ylim()  # kl is 0 throughout: no negative ticks on its axis
  assert lo == 0.0 and hi > 0.0
  assert all(t >= 0 for t in panels["kl"].get_yticks() if lo <= t <= hi)
  plt.close("all")


@pytest.mark.parametrize("values", [{1: 0.0, 2: 0.0, 3: 0.0}, {1: 40.0, 2: 40.0}, {1: 0.0, 2: 100.0}])
def test_percent_plots_keep_their_axis_within_0_and_100(values: dict, tmp_path: pathlib.Path, monkeypatch):
  figs = _captured_figures(monkeypatch)
  plots.accuracy_by_length(values, str(tmp_path / "acc.png"), ylabel="valid (%)")
  ax = figs[0].axes[0]
  lo, hi = ax.get_ylim()
  assert lo == 0.0 and hi <= 100.0 and (hi > max(values.values()) or hi == 100.0)
  assert all(0 <= t <= 100 for t in ax.get_yticks() if lo <= t <= hi)
  plt.close("all")
