"""The lm-evaluation-harness backend: log-likelihoods, rolling windows and greedy generation against
direct forwards of the trunk, and the harness end to end on a local multiple-choice task."""
import functools
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON tasks only; never the Hub

import jax
import numpy as np
import pytest
from flax import linen as nn

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from nextlat_jax.data import packing
from nextlat_jax.data.tasks.manhattan import WordTokenizer
from nextlat_jax.interop import lm_eval_backend
from nextlat_jax.models.transformer import ModelConfig, Transformer, unembed

TOK = WordTokenizer([str(i) for i in range(20)])  # pad 0, end 1, 8 directions, 20 nodes: V = 30
MAX_LEN = 8


def _model(seed=0):
  cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layer=2, n_head=2, init_std=0.3)
  x = np.zeros((1, 2), np.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), x, x, x)["params"]), cfg


@functools.partial(jax.jit, static_argnums=(1,))
def _logits(params, cfg, tokens, seg, pos):
  h, _ = Transformer(cfg).apply({"params": params}, tokens, seg, pos)
  return unembed(h, params["head"])


def _logp(params, cfg, inp, eos_id=TOK.eos_id):
  """float64 log-softmax of the trunk's logits over one row (batch-contract layout), computed on the row
  alone, right-padded to a fixed width (causal: the padding cannot reach it)."""
  n = len(inp)
  tokens = np.zeros((1, max(16, n)), np.int32)
  tokens[0, :n] = inp
  seg, pos = packing.segment_ids_and_positions(tokens, eos_id)
  logits = np.asarray(_logits(params, cfg, tokens, seg, pos), np.float64)[0, :n]
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _direct(params, cfg, ctx, cont, max_len=MAX_LEN, eos_id=TOK.eos_id):
  """(sum log p(cont | ctx), greedy) straight from the logits, with the harness's left truncation."""
  full = (list(ctx) + list(cont))[-(max_len + 1):]
  lp = _logp(params, cfg, full[:-1], eos_id)
  rows = range(len(full) - 1 - len(cont), len(full) - 1)
  return (sum(lp[t, full[t + 1]] for t in rows), all(int(np.argmax(lp[t])) == full[t + 1] for t in rows))


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _lm(params, cfg, **kw):
  return lm_eval_backend.NextLatLM(params, cfg, TOK, eos_id=TOK.eos_id, max_length=MAX_LEN, batch_size=3,
                                   min_bucket=4, **kw)


def test_loglikelihood_matches_direct_logits():
  params, cfg = _model()
  lm = _lm(params, cfg)
  lp = _logp(params, cfg, TOK.encode("3 12"))
  best = TOK.decode([int(np.argmax(lp[-1]))])[0]
  worst = TOK.decode([int(np.argmin(lp[-1]))])[0]
  pairs = [("3 12", f" {best}"), ("3 12", f" {worst}"), ("3 12", " N E"), ("", " 5 6 7"),
           ("end 4 N S E W", " 9"), ("1 2 3 4 5 6 7 8 9 10 11 12", " N S"), ("7", " end 8 W")]
  got = lm.loglikelihood([_req("loglikelihood", *p) for p in pairs])
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    ctx_ids = [TOK.eos_id] if not ctx else list(TOK.encode(ctx))
    want = _direct(params, cfg, ctx_ids, list(TOK.encode(cont)))
    assert ll == pytest.approx(want[0], abs=2e-5), (ctx, cont)
    assert greedy == want[1], (ctx, cont)
  assert got[0][1] and not got[1][1] and got[0][0] > got[1][0]


def test_loglikelihood_rolling_sums_the_harness_windows():
  params, cfg = _model(1)
  lm = _lm(params, cfg)
  rng = np.random.default_rng(0)
  long_doc = " ".join(TOK.words[i] for i in rng.integers(2, TOK.vocab_size, 21))
  short_doc = "4 N E 9 W"
  got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", d) for d in (long_doc, short_doc, "")])
  ids = list(TOK.encode(long_doc))
  windows = [lm_utils.make_disjoint_window(w) for w in
             lm_utils.get_rolling_token_windows(ids, TOK.eos_id, MAX_LEN, 1)]
  assert len(windows) == 3 and sum(len(p) for _, p in windows) == len(ids)  # every token scored once
  assert got[0] == pytest.approx(sum(_direct(params, cfg, c, p)[0] for c, p in windows), abs=1e-4)
  # a document within the context: the rolling LL is the full-context LL of EOS + doc
  short = [TOK.eos_id] + list(TOK.encode(short_doc))
  lp = _logp(params, cfg, short[:-1])
  assert got[1] == pytest.approx(sum(lp[t, short[t + 1]] for t in range(len(short) - 1)), abs=2e-5)
  assert got[2] == 0.0


def test_generate_until_is_greedy_decoding_cut_at_stop():
  params, cfg = _model(2)
  lm = _lm(params, cfg)
  contexts = ["3 12", "end 4 N", "7"]
  got = lm.generate_until([_req("generate_until", c, {"until": ["9"], "max_gen_toks": 4}) for c in contexts])
  for ctx, text in zip(contexts, got):
    seq, new = list(TOK.encode(ctx)), []
    for _ in range(4):  # the reference: argmax of a full forward, one token at a time
      nxt = int(np.argmax(_logp(params, cfg, seq)[-1]))
      if nxt == TOK.eos_id:
        break
      seq.append(nxt)
      new.append(nxt)
    want = (" " + " ".join(TOK.decode(new))) if new else ""
    assert text == want.split("9")[0].split(" end")[0], (ctx, text, want)


def _write_task(directory, docs):
  data = directory / "toy.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (directory / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {directory / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def _docs(n=8):
  rng = np.random.default_rng(1)
  choices = ["N", "SE", "end", "W"]
  return [{"context": f"{rng.integers(20)} {rng.integers(20)} {choices[rng.integers(4)]}", "choices": choices,
           "label": int(rng.integers(4))} for _ in range(n)]


def _hand_accuracy(params, cfg, docs, tok=TOK, max_len=MAX_LEN):
  acc, acc_norm = [], []
  for d in docs:
    ctx = list(tok.encode(d["context"]))
    lls = np.array([_direct(params, cfg, ctx, list(tok.encode(d["context"] + " " + c))[len(ctx):], max_len,
                            tok.eos_id)[0] for c in d["choices"]])
    acc.append(int(np.argmax(lls)) == d["label"])
    acc_norm.append(int(np.argmax(lls / np.array([len(c) for c in d["choices"]]))) == d["label"])
  return float(np.mean(acc)), float(np.mean(acc_norm))


def test_harness_end_to_end_multiple_choice(tmp_path):
  from lm_eval.tasks import TaskManager
  params, cfg = _model(3)
  docs = _docs()
  _write_task(tmp_path, docs)
  out = lm_eval.simple_evaluate(model=_lm(params, cfg), tasks=["toy_mc"], log_samples=False,
                                task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
  acc, acc_norm = _hand_accuracy(params, cfg, docs)
  assert 0.0 < acc < 1.0  # the check can fail either way
  assert out["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)
  assert out["results"]["toy_mc"]["acc_norm,none"] == pytest.approx(acc_norm)


def test_command_on_a_sharded_checkpoint(tmp_path):
  """`nextlat lm-eval` on a saved street-grid run, its trunk sharded over data x fsdp x tensor."""
  from absl import flags

  import nextlat_jax.cli  # noqa: F401  (defines --workdir and --step)
  from configs import quickstart
  from nextlat_jax.data import pipeline
  from nextlat_jax.interop import hf_config
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.run import load_run
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  c = quickstart.get_config()
  c.model.update(n_layer=2, d_model=32, n_head=2, init_std=0.3)
  c.dynamics.hidden, c.data.seq_len, c.batch_size = 64, 16, 8
  config, _ = preflight.resolve(c)
  setup = step_lib.build(config, make_mesh(config.mesh))
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1)
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"), config.checkpoint)
  checkpoint.save(mgr, 3, setup.init(jax.random.PRNGKey(0)), pipeline.BatchIterator(ds, 3, {}), config, force=True)
  mgr.wait_until_finished()
  docs = _docs()  # node ids 0..19, directions and end are words of the run's 8x8 street grid too
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  _write_task(tasks, docs)
  argv = ["nextlat lm-eval", f"--workdir={tmp_path}", "--tasks=toy_mc", f"--include_path={tasks}",
          "--lm_eval_mesh=2,2,2", "--lm_eval_batch_size=3"]
  flags.FLAGS(argv)
  try:
    lm_eval_backend.lm_eval_command(argv)
  finally:
    flags.FLAGS.unparse_flags()
  results = json.loads((tmp_path / "lm_eval" / "results_step3.json").read_text())
  run = load_run(str(tmp_path))  # unsharded reference
  acc, acc_norm = _hand_accuracy(hf_config.llama_trunk(run), run.cfg, docs, run.tokenizer, max_len=16)
  assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(acc)
  assert results["results"]["toy_mc"]["acc_norm,none"] == pytest.approx(acc_norm)
  assert results["config"]["nextlat_step"] == 3


def _lm_eval(argv, capsys=None):
  from absl import flags

  import nextlat_jax.cli  # noqa: F401  (defines --workdir and --step)
  argv = ["nextlat lm-eval", *argv]
  flags.FLAGS(argv)
  try:
    lm_eval_backend.lm_eval_command(argv)
  finally:
    flags.FLAGS.unparse_flags()


def _rolling_ll(trunk, cfg, tok, text, max_len):
  """The harness's rolling log-likelihood of `text` (disjoint windows of max_len, EOS first) by hand."""
  ids = [int(t) for t in tok.encode(text)]
  windows = [lm_utils.make_disjoint_window(w) for w in
             lm_utils.get_rolling_token_windows(ids, tok.eos_id, max_len, 1)]
  return sum(_direct(trunk, cfg, c, p, max_len, tok.eos_id)[0] for c, p in windows)


def test_local_text_task_runs_offline_with_the_runs_tokenizer():
  """configs/lm_eval's local perplexity task on a BPE text run (tokenizer from the run's data config,
  --max_length overriding the run's 16): perplexities equal the rolling log-likelihoods by hand."""
  import math
  import re

  from nextlat_jax.interop import hf_config
  from nextlat_jax.run import load_run
  from tests.conftest import REPO
  from tests.text_run import shared_text_run
  run_dir = shared_text_run()
  _lm_eval([f"--workdir={run_dir}", f"--include_path={REPO / 'configs' / 'lm_eval'}", "--tasks=nextlat_local_text",
            "--max_length=12", "--lm_eval_batch_size=4"])
  results = json.loads((run_dir / "lm_eval" / "results_step2.json").read_text())["results"]["nextlat_local_text"]
  run = load_run(str(run_dir))
  trunk, tok = hf_config.llama_trunk(run), run.tokenizer
  docs = [json.loads(line)["text"] for line in (REPO / "configs/lm_eval/local_text.jsonl").read_text().splitlines()]
  lls = [_rolling_ll(trunk, run.cfg, tok, d, 12) for d in docs]
  words = sum(len(re.split(r"\s+", d)) for d in docs)
  n_bytes = sum(len(d.encode("utf-8")) for d in docs)
  assert results["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
  assert results["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-4)
  assert results["bits_per_byte,none"] == pytest.approx(-sum(lls) / n_bytes / math.log(2), rel=1e-4)
  # the override mattered: the run's own context (16) gives other windows, another log-likelihood
  assert abs(_rolling_ll(trunk, run.cfg, tok, docs[0], 16) - lls[0]) > 1e-3


def test_task_whose_dataset_is_not_here_is_one_line(tmp_path, capsys, monkeypatch):
  """Offline (HF_DATASETS_OFFLINE, an empty datasets cache), a Hub task: exit 2, one line naming the task
  and how to make its data available, no traceback."""
  import datasets
  import huggingface_hub

  from tests.text_run import shared_text_run
  for module in (datasets.config, huggingface_hub.constants):
    monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
  (tmp_path / "remote.yaml").write_text("""task: remote_lambada
dataset_path: EleutherAI/lambada_openai
dataset_name: default
test_split: test
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: acc
""")
  with pytest.raises(SystemExit) as e:
    _lm_eval([f"--workdir={shared_text_run()}", f"--include_path={tmp_path}", "--tasks=remote_lambada"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  (line,) = [x for x in err.splitlines() if x.startswith("nextlat lm-eval:")]
  assert "Traceback" not in err
  assert "task remote_lambada:" in line and "EleutherAI/lambada_openai" in line
  assert "HF_DATASETS_OFFLINE=1" in line and "--include_path" in line
  with pytest.raises(SystemExit):  # an unknown task name: one line too
    _lm_eval([f"--workdir={shared_text_run()}", f"--include_path={tmp_path}", "--tasks=no_such_task"])
  assert "unknown task no_such_task" in capsys.readouterr().err
