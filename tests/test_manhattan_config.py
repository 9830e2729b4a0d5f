"""configs/manhattan.py: the paper's Table 5 world-model settings on the real street graph, and its tiny
preset trains (loss falls from ln V) on ../shared/data/manhattan/edges.tsv."""
import math
import pathlib

import pytest

from nextlat_jax.config import load_config_file
from nextlat_jax.train import metrics_writer, preflight, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config(arg=None):
  return load_config_file("manhattan", arg)


def test_paper_settings():
  c = get_config()
  assert (c.steps, c.batch_size, c.data.seq_len) == (400_000, 256, 256)
  assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.dynamics.hidden) == (48, 8, 384, 1536)
  assert (c.optimizer.lr, c.optimizer.schedule, c.optimizer.weight_decay, c.optimizer.grad_clip) == (
      1e-4, "constant", 0.01, 0.0)
  assert (c.objective.name, c.objective.horizon, c.objective.lambda_next_h, c.objective.lambda_kl) == (
      "nextlat", 8, 1.0, 0.1)
  assert c.data.name == "manhattan" and c.data.max_moves == 97
  assert get_config("gpt,d4").objective.name == "gpt" and get_config("gpt,d4").objective.horizon == 4
  assert get_config("tiny").objective.horizon == 2 and get_config("tiny,d3").objective.horizon == 3


def test_tiny_preset_trains_on_the_real_graph(tmp_path):
  c = get_config("tiny")
  if not pathlib.Path(c.data.graph_path).is_file():
    pytest.skip(f"{c.data.graph_path} absent")
  c.train.sharding_canary = False  # the suite's 8 fake devices; the canary has its own tests
  resolved, info = preflight.resolve(c)
  assert info.vocab_size == 1 + 9 + 4579  # pad, end, 8 directions, every node of the file
  trainer.train(c, str(tmp_path))
  history = metrics_writer.read_history(str(tmp_path / "metrics.jsonl"))
  ce, eval_ce = dict(history["ce"]), dict(history["eval_ce"])
  assert list(ce) == [10, 20, 30] and ce[10] > ce[20] > ce[30], ce
  # measured: 7.19, 5.97, 4.67 nats against ln V = 8.43 (uniform): which words follow which is learned
  assert ce[30] < 0.65 * math.log(info.vocab_size), ce
  assert list(eval_ce) == [15, 30] and eval_ce[30] < eval_ce[15], eval_ce
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["15", "30"]
