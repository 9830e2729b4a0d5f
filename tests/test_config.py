"""Bad config values stop before compiling with one line naming the key and the value."""
import subprocess
import sys

import jax
import ml_collections
import pytest

from nextlat_jax.config import ConfigError
from nextlat_jax.train import preflight
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402


def _config(**overrides) -> ml_collections.ConfigDict:
  c = quickstart.get_config()
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


BAD = [
    ({"model.d_model": 130}, "model.d_model=130", "divisible by model.n_head=4"),
    ({"mesh.data": 3}, "mesh=", "!= device count 8"),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, "mesh=", "product 4 != device count 8"),
    ({"objective.horizon": 0}, "objective.horizon=0", "must be >= 1 for nextlat"),
    ({"objective.name": "bert"}, "objective.name='bert'", "unknown objective"),
    ({"batch_size": 12}, "batch_size=12", "divisible by the data-parallel size mesh.data*mesh.fsdp=8"),
    ({"optimizer.schedule": "linear"}, "optimizer.schedule='linear'", "must be one of"),
    ({"model.d_model": 16, "model.n_head": 2}, "model.ffn_width=0", "= 0 for d_model=16; set a width"),
    ({"model.remat": "some"}, "model.remat='some'", "must be one of"),
    ({"model.vocab_size": 10}, "model.vocab_size=10", "smaller than the dataset's vocabulary (74)"),
    ({"model.dtype": "float16"}, "model.dtype='float16'", "must be one of"),
    ({"data.name": "nope"}, "data='nope'", "unknown dataset"),
    ({"train.profile.start_step": -2}, "train.profile.start_step=-2", "must be -1 (off) or a step >= 0"),
    ({"train.profile.start_step": 600}, "train.profile.start_step=600", "must be < steps=600"),
    ({"train.profile.steps": 0}, "train.profile.steps=0", "must be >= 1"),
]


@pytest.mark.parametrize("overrides,key_part,why_part", BAD)
def test_bad_value_names_key_and_value(overrides, key_part, why_part):
  assert jax.device_count() == 8
  with pytest.raises(ConfigError) as err:
    preflight.resolve(_config(**overrides))
  msg = str(err.value)
  assert msg.startswith("config error: ") and "\n" not in msg
  assert key_part in msg and why_part in msg, msg


def test_good_config_resolves_vocab_and_eos():
  config, info = preflight.resolve(_config())
  assert config.model.vocab_size == info.vocab_size == 74
  assert config.data.eos_id == info.eos_id == 1
  assert info.row_len == config.data.seq_len + 1


def test_cli_reports_one_line_and_exit_2(tmp_path):
  """A user error from the command line: exit status 2, one line on stderr, no traceback."""
  proc = subprocess.run(
      [sys.executable, "-m", "nextlat_jax.cli", "train", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.model.n_head=5"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)})
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("config error:")]
  assert errors == ["config error: model.d_model=128: must be divisible by model.n_head=5"], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()
