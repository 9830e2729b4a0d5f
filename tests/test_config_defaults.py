"""The config in one place: a saved config reads over base_config() (old runs lack newer keys), and
nextlat_jax.config imports none of the modules whose checks it runs at import time."""
import ast
import json
import pathlib
import sys

from nextlat_jax import config as config_lib
from nextlat_jax.train import preflight

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import quickstart  # noqa: E402


def _saved(config) -> dict:
  """The config as a checkpoint stores it (JSON: tuples become lists)."""
  return json.loads(config.to_json())


def test_from_saved_fills_the_keys_an_older_run_lacks():
  resolved, _ = preflight.resolve(quickstart.get_config())
  saved = _saved(resolved)
  for section, key in (("objective", "token_loss"), ("dynamics", "window"), ("optimizer", "muon_lr")):
    del saved[section][key]
  del saved["microbatches"], saved["eval_task"], saved["train"]
  saved["objective"]["horizon"] = 3
  old = config_lib.from_saved(saved)
  base = config_lib.base_config()
  assert old.objective.token_loss == base.objective.token_loss == "kl"
  assert old.dynamics.window == base.dynamics.window == 4
  assert old.optimizer.muon_lr == base.optimizer.muon_lr
  assert old.microbatches == 1 and old.eval_task is None and old.train.sharding_canary is True
  assert old.objective.horizon == 3  # a saved value wins over the default
  assert old.data.to_dict() == saved["data"]  # sections base_config has not are kept whole
  assert old.dynamics.hidden == 256 and old.model.d_model == 128  # the run's values, not base_config's


def test_a_complete_saved_config_reads_back_as_it_was_saved():
  resolved, _ = preflight.resolve(quickstart.get_config())
  again, _ = preflight.resolve(config_lib.from_saved(_saved(resolved)))
  assert json.loads(again.to_json()) == _saved(resolved)


def test_config_module_imports_no_validated_module_at_import_time():
  """config.py's module-level imports: the standard library, ml_collections and nextlat_jax.errors (the
  checks beside what they check are imported inside validate, so they may import config.py's users)."""
  tree = ast.parse((REPO / "nextlat_jax" / "config.py").read_text())
  top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
  names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in top if isinstance(n, ast.ImportFrom)}
  assert {m for m in names if m.startswith("nextlat_jax")} == {"nextlat_jax.errors"}, names
