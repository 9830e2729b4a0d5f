"""A tiny saved text run for the commands that read a run (generate, export-hf, lm-eval): a byte-level BPE
trained on a few English sentences, a fineweb_edu (jsonl) data config that names it directly, and a
NextLat model saved at step 2 (random weights drawn on the host: matrices of std 0.3, peaked distributions;
vectors (norm scales) 1; zero optimizer state. Nothing compiles: no init, no train step)."""
import functools
import json
import pathlib
import tempfile

import jax
import numpy as np

SENTENCES = ["In the beginning the red cat sees the old river.", "The quiet dog follows the bright ship home.",
             "It was the best of times, it was the worst of times.", "A small bird finds the cold garden at dawn."]


def save_text_run(path: pathlib.Path, seq_len: int = 16, vocab_size: int = 300) -> pathlib.Path:
  """Writes PATH/corpus.jsonl, PATH/bpe.json and the run PATH/run (checkpoint step 2); returns PATH/run."""
  from nextlat_jax.config import base_config
  from nextlat_jax.data import tokenizers
  from nextlat_jax.data.sources import fineweb
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  texts = SENTENCES * 8
  (path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  tokenizers.BPETokenizer.train(texts, vocab_size=vocab_size).save(str(path / "bpe.json"))
  c = base_config()
  c.data = fineweb.default_data_config()
  c.data.update(path=str(path / "corpus.jsonl"), tokenizer="bpe", tokenizer_path=str(path / "bpe.json"),
                seq_len=seq_len)
  c.model.update(d_model=32, n_layer=2, n_head=2, init_std=0.3)
  c.dynamics.hidden = 64
  c.objective.update(name="nextlat", horizon=1)
  c.batch_size = 8
  config, _ = preflight.resolve(c)
  setup = step_lib.build(config, make_mesh(config.mesh))
  rng = np.random.default_rng(4)
  put = lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding)
  draw = lambda a: put(0.3 * rng.standard_normal(a.shape) if len(a.shape) >= 2 else np.ones(a.shape), a)
  abstract = setup.abstract_state
  state = jax.tree.map(lambda a: put(np.zeros(a.shape), a), abstract)
  state = state.replace(params=jax.tree.map(draw, abstract.params))
  run = path / "run"
  mgr = checkpoint.manager(str(run / "checkpoints"), config.checkpoint)
  checkpoint.save(mgr, 2, state, None, config, force=True)
  mgr.wait_until_finished()
  mgr.close()
  return run


@functools.lru_cache(maxsize=None)
def shared_text_run() -> pathlib.Path:
  """One save_text_run per test process, shared by the modules that only read it (one ~10 s save)."""
  return save_text_run(pathlib.Path(tempfile.mkdtemp(prefix="nextlat_text_run_")))
