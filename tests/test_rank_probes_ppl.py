"""Effective rank on known spectra, linear probes (targets, per-probe clipping), perplexities against
hand computations, plots, and `nextlat eval` on a tiny trained checkpoint end to end."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from nextlat_jax.eval import plots, run
from nextlat_jax.eval.metrics import perplexity as ppl
from nextlat_jax.eval.metrics import probes
from nextlat_jax.eval.metrics import rank
from nextlat_jax.run import load_run
from tests.conftest import CPU_FAST_COMPILE, REPO


# ---- effective rank ----

def _with_spectrum(sigma, n=50, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(n, len(sigma))))
  v, _ = np.linalg.qr(rng.normal(size=(len(sigma), len(sigma))))
  return (u * np.asarray(sigma)) @ v.T


def test_effective_rank_of_known_spectra():
  for n in (1, 5, 64):
    assert rank.effective_rank(rank.singular_values(np.eye(n))) == pytest.approx(n, rel=1e-9)
  rank1 = np.outer(np.arange(1.0, 41.0), np.linspace(-1.0, 2.0, 16))
  assert rank.effective_rank(rank.singular_values(rank1)) == pytest.approx(1.0, abs=1e-6)
  assert rank.effective_rank(rank.singular_values(rank1), "discard") == pytest.approx(1.0, abs=1e-9)
  sigma = rank.singular_values(_with_spectrum([2.0, 1.0, 1.0]))
  np.testing.assert_allclose(sigma, [2.0, 1.0, 1.0], atol=1e-9)
  assert rank.effective_rank(sigma) == pytest.approx(math.exp(1.0397207708), rel=1e-9)  # 2.828
  assert rank.effective_rank(sigma) == pytest.approx(2.0 * math.sqrt(2.0), rel=1e-9)
  p = np.array([4.0, 3.0, 2.0, 1.0]) / 10.0
  assert rank.effective_rank([4.0, 3.0, 2.0, 1.0, 0.0]) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
  # the two tiny-value rules: discard drops sigma < 1e-12; clamp keeps them at p >= 1e-12
  s = [1.0, 1.0, 1e-14, 0.0]
  assert rank.effective_rank(s, "discard") == pytest.approx(2.0, rel=1e-12)
  assert 0 < rank.effective_rank(s, "clamp") - 2.0 < 1e-9


def test_rank_stats_and_batches():
  m = _with_spectrum([10.0, 5.0, 1e-4])
  stats = rank.rank_stats(rank.singular_values(m))
  assert stats["numerical_rank"] == 2  # sigma > max(1e-3, 1e-3 sigma_max) = 0.01
  assert stats["condition_number"] == pytest.approx(1e5, rel=1e-6)
  out = rank.erank_of_batches([np.eye(4)[None], 2 * np.eye(8)[:, :4][None]])
  assert out["erank"] == pytest.approx(4.0) and out["erank_mean_over_batches"] == pytest.approx(4.0)
  assert out["batches"] == 2 and out["spectrum"] == pytest.approx([1.0] * 4)
  with pytest.raises(ValueError, match="non-finite"):
    rank.singular_values(np.array([[np.nan, 1.0]]))


# ---- perplexity ----

V = 37


def uniform_scorer(tokens_BxT):
  B, T = tokens_BxT.shape
  return np.full((B, T - 1), -math.log(V)), np.zeros((B, T - 1), bool)


def context_scorer(tokens_BxT):
  """log p(next) = -log(1 + number of tokens it is conditioned on); greedy iff the next token is 7."""
  B, T = tokens_BxT.shape
  return np.tile(-np.log(2.0 + np.arange(T - 1)), (B, 1)), tokens_BxT[:, 1:] == 7


def test_token_perplexity_of_a_uniform_model_is_the_vocabulary_size():
  rng = np.random.default_rng(0)
  batches = [{"tokens": rng.integers(0, V, (4, 17)), "loss_mask": rng.integers(0, 2, (4, 17))} for _ in range(3)]
  out = ppl.token_perplexity(uniform_scorer, batches)
  assert out["token_ppl"] == pytest.approx(V, rel=1e-9)
  assert out["tokens"] == sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)


def test_rolling_windows_match_lm_eval():
  t = [10, 11, 12, 13, 14]
  assert ppl.rolling_windows(t, 2, 99) == [([99], [10, 11]), ([11], [12, 13]), ([12, 13], [14])]
  assert ppl.rolling_windows(t, 8, 99) == [([99], t)]
  assert ppl.rolling_windows([], 4, 99) == []
  windows = ppl.rolling_windows(list(range(23)), 5, 99)
  assert [x for _, c in windows for x in c] == list(range(23))  # every token scored once
  assert all(len(c) + len(cont) - 1 <= 5 for c, cont in windows)  # inputs never exceed max_len


def test_rolling_word_perplexity_by_hand():
  # 5 tokens, max_len 2: the tokens are conditioned on 1, 2, 1, 2 and 2 tokens (windows above)
  ll = ppl.rolling_loglikelihood(context_scorer, [10, 11, 12, 13, 14], 2, 99)
  assert ll == pytest.approx(-(2 * math.log(2) + 3 * math.log(3)), rel=1e-12)
  encode = lambda s: [ord(c) % 50 for c in "".join(s.split())]  # noqa: E731  5 tokens for the page below
  page = "ab  c\nde"  # 3 words (split on whitespace runs), 8 bytes
  out = ppl.word_perplexity(context_scorer, [page], encode, 2, 99)
  assert out["words"] == 3 and out["bytes"] == 8
  assert out["word_perplexity"] == pytest.approx(math.exp(-ll / 3), rel=1e-12)
  assert out["bits_per_byte"] == pytest.approx(-ll / (8 * math.log(2)), rel=1e-12)
  # a document within max_len: the rolling LL is the full-context LL
  doc = list(range(3, 40))
  full = -sum(math.log(2.0 + t) for t in range(len(doc)))
  assert ppl.rolling_loglikelihood(context_scorer, doc, 1024, 99) == pytest.approx(full, rel=1e-12)


def test_lambada_ppl_and_accuracy():
  encode = lambda s: [ord(c) for c in s]  # noqa: E731  one token per character
  pairs = [("the cat", " sat"), ("a dog ", "ran"), ("x", " \x07")]
  ctx, cont = ppl.encode_pair(encode, "a dog ", "ran", 0)  # trailing space moves to the continuation
  assert ctx == encode("a dog") and cont == encode(" ran")
  out = ppl.lambada(uniform_scorer, pairs, encode, 1024, 0)
  # per passage LL = -(target tokens) log V: 4, 4 and 2 tokens
  assert out["lambada_ppl"] == pytest.approx(math.exp((4 + 4 + 2) / 3 * math.log(V)), rel=1e-9)
  assert ppl.lambada(context_scorer, pairs, encode, 1024, 0)["lambada_acc"] == pytest.approx(0.0)
  acc = ppl.lambada(context_scorer, [("x", "\x07\x07"), ("y", "\x07a")], encode, 1024, 0)["lambada_acc"]
  assert acc == pytest.approx(50.0)  # greedy on all target tokens of passage 1 only


# ---- probes ----

def test_probe_targets_skip_later_documents_and_the_row_end():
  eos = 1
  tokens = np.array([[5, 6, 1, 7, 8, 0]])
  segment = np.array([[0, 0, 1, 1, 1, -1]])  # the last token is padding
  tgt, mask = probes.targets(tokens, segment, eos, 3)
  # offset 1: t=0->6, t=1->EOS (closes the document: kept), t=2->7, t=3->8, t=4->pad (skipped)
  assert mask[0, 0].tolist() == [True, True, True, True, False]
  assert tgt[0, 0, :4].tolist() == [6, 1, 7, 8]
  # offset 2: t=0 -> EOS (x_1 between is not EOS: kept), t=1 -> 7 (an EOS between: skipped)
  assert mask[1, 0].tolist() == [True, False, True, False, False]
  # offset 3: t=0 -> 7 skipped (EOS between), t=2 -> pad skipped, t >= 3 past the row end
  assert mask[2, 0].tolist() == [False, False, False, False, False]


def test_probes_learn_and_train_independently():
  """On one-hot features of a cyclic sequence every offset is predictable; 3 probes trained together
  equal each trained alone (clipping is per probe), and the CE falls far below uniform."""
  Vp, L, B = 8, 17, 4
  rng = np.random.default_rng(0)
  starts = rng.integers(0, Vp, (64, B))
  batches = [{"tokens": ((s[:, None] + np.arange(L)) % Vp).astype(np.int32),
              "segment_ids": np.zeros((B, L), np.int32)} for s in starts]
  hidden = lambda b: np.eye(Vp, dtype=np.float32)[b["tokens"]] * 3.0  # noqa: E731
  cfg = probes.ProbeConfig(offsets=3, steps=60, lr=0.05, clip=0.05)
  together, _ = probes.train(hidden, batches, eos_id=-1, vocab=Vp, cfg=cfg)
  ce = probes.validation_ce(hidden, together, batches[:4], eos_id=-1)
  assert np.all(ce < 0.5 * math.log(Vp))
  cfg1 = probes.ProbeConfig(offsets=1, steps=60, lr=0.05, clip=0.05)
  alone, _ = probes.train(hidden, batches, eos_id=-1, vocab=Vp, cfg=cfg1)
  np.testing.assert_allclose(np.asarray(together["w"][0]), np.asarray(alone["w"][0]), rtol=1e-5, atol=1e-6)


def test_clip_per_probe():
  tx = probes.clip_per_probe(1.0)
  g = {"w": jax.numpy.array([[3.0, 4.0], [0.3, 0.4]]), "b": jax.numpy.zeros((2, 1))}
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.asarray(out["w"]), [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


# ---- plots ----

def test_plots_write_pngs(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 10, "loss": 3.0, "ce": 3.0},
                                                           {"step": 20, "loss": 2.0, "ce": 2.1},
                                                           {"step": 20, "eval_loss": 2.2}]) + '{"trunc')
  paths = [plots.training_curves(str(metrics), str(tmp_path / "curves.png")),
           plots.spectrum([3.0, 2.0, 1.0, 0.0], str(tmp_path / "spectrum.png")),
           plots.accuracy_by_length({1: 99.0, 12: 50.0, 36: 10.0}, str(tmp_path / "acc.png")),
           plots.probe_ce({"gpt": {1: 1.0, 2: 2.0}, "nextlat": {1: 1.1, 2: 1.8}}, str(tmp_path / "probe.png"))]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---- nextlat eval end to end ----

def test_orbax_read_only_notices_are_dropped(tmp_path, caplog):
  """A restore-only manager is read-only by design: Orbax's notice about it never reaches a handler,
  whatever absl's level (outside checkpoint._quiet_absl too)."""
  import logging

  import orbax.checkpoint as ocp
  from nextlat_jax.train import checkpoint  # installs the filter
  assert checkpoint._READ_ONLY_NOTICE in logging.getLogger("absl").filters
  with caplog.at_level(logging.INFO, logger="absl"):
    ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    logging.getLogger("absl").warning("an unrelated warning is kept")
  messages = [r.getMessage() for r in caplog.records]
  assert "an unrelated warning is kept" in messages
  assert not [m for m in messages if "read only" in m], messages


def test_nextlat_eval_writes_task_json_and_pngs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = CPU_FAST_COMPILE  # one CPU device
  tiny = ["--config.model.d_model=32", "--config.model.n_layer=1", "--config.model.n_head=2",
          "--config.batch_size=8", "--config.data.seq_len=64"]
  cli = [sys.executable, "-m", "nextlat_jax.cli"]
  proc = subprocess.run(cli + ["train", "--config=configs/quickstart.py:gpt", f"--workdir={tmp_path}",
                               "--config.steps=20", "--config.checkpoint.every=10"] + tiny,
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run(cli + ["eval", f"--workdir={tmp_path}", "--metrics=all", "--num_samples=2",
                               "--eval_batch_size=32", "--rank_batches=1"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not [ln for ln in proc.stderr.splitlines() if "read only" in ln], proc.stderr  # Orbax's notices
  held_out, tasks = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
  assert held_out["step"] == 20 and (tmp_path / "eval_20.json").exists()
  assert held_out["eval_perplexity"] == pytest.approx(math.exp(held_out["eval_ce"]), rel=1e-12)
  for bar in ("next-token test", "valid trajectories", "compression (reference)", "effective rank"):
    assert re.search(re.escape(bar) + r": 100%.*<00:00", proc.stderr), bar  # a progress bar with ETA
  wm = json.loads((tmp_path / "eval" / "street_grid.json").read_text())
  assert wm["step"] == 20 and wm["valid_pairs"] == 2 and wm["compression_reference_trials"] == 2
  for key in ("next_token_test", "valid_reached_end", "valid_legal", "detour_random_valid"):
    assert 0.0 <= wm[key] <= 100.0 and tasks["street_grid"][key] == wm[key]
  r = json.loads((tmp_path / "eval" / "rank.json").read_text())
  assert 1.0 <= r["erank"] <= 32 and len(r["spectrum"]) == 32 and r["tokens_per_batch"] == 256 * 256
  for png in ("spectrum.png", "training_curves.png", "valid_by_hops.png"):
    assert (tmp_path / "eval" / png).stat().st_size > 1000
  with pytest.raises(ValueError, match="--task='nope': no metrics registered"):
    run.metric_function("nope")

  # --metrics: default is effective rank only; NAME,... runs those families of the task, nothing else
  (tmp_path / "eval" / "street_grid.json").unlink()
  loaded = load_run(str(tmp_path))
  out = run.task_metrics(loaded, None, 2, batch_size=32, rank_batches=1, show_progress=False, metrics="default")
  assert set(out) == {"rank"} and out["rank"]["erank"] == pytest.approx(r["erank"], rel=1e-4)
  assert not (tmp_path / "eval" / "street_grid.json").exists()
  out = run.task_metrics(loaded, None, 2, batch_size=32, show_progress=False, metrics="valid_trajectories")
  assert set(out) == {"street_grid"} and out["street_grid"]["valid_legal"] == wm["valid_legal"]
  assert not any(k.startswith(("next_token", "compression", "detour")) for k in out["street_grid"])
  with pytest.raises(ValueError, match="unknown metric detour; .* rank, next_token, valid_trajectories"):
    run.task_metrics(loaded, metrics="detour")

  # in process (8 fake devices): token perplexity on the held-out rows the trainer's eval reads, and
  # probes against the run itself as the reference (the CE difference is then exactly 0)
  task_run = run.restore(str(tmp_path), None, batch_size=8, show_progress=False,
                         options={"probe_steps": 3, "probe_val_batches": 2, "probe_reference": str(tmp_path)})
  out = ppl.evaluate(task_run)
  assert out["tokens"] > 1000 and abs(math.log(out["token_ppl"]) - held_out["eval_ce"]) < 0.05
  out = probes.evaluate(task_run)
  assert sorted(out["probe_ce"]) == list(range(1, 21))
  assert all(0 < v < 2 * math.log(74) for v in out["probe_ce"].values())
  assert all(v == 0.0 for v in out["probe_ce_difference"].values())
  assert (tmp_path / "eval" / "probe_ce.png").exists() and (tmp_path / "eval" / "probe_ce_difference.png").exists()


# ---- nextlat eval: flag mistakes ----

# case -> (flags after `nextlat eval --workdir=R`, what the one error line says); each is refused before the
# run's parameters are restored or anything is evaluated, so R is left exactly as it was
EVAL_FLAG_MISTAKES: dict[str, tuple[list[str], list[str]]] = {
    "unknown_metric": (["--metrics=bogus"], ["--metrics='bogus'", "unknown metric bogus", "valid_trajectories"]),
    "unknown_family": (["--metrics=rank,detour"], ["--metrics='rank,detour'", "unknown metric detour"]),
    "unknown_task": (["--task=bogus"], ["--task='bogus'", "no metrics registered", "street_grid", "rank"]),
    "task_of_other_data": (["--task=path_star", "--metrics=all"],
                           ["--task='path_star'", "needs a run trained on path_star", "'street_grid'"]),
    "num_samples": (["--num_samples=-1", "--metrics=all"], ["--num_samples=-1", "must be >= 1"]),
    "eval_batch_size": (["--eval_batch_size=0", "--metrics=all"], ["--eval_batch_size=0", "must be >= 1"]),
    "rank_batches": (["--rank_batches=0"], ["--rank_batches=0", "must be >= 1"]),
    "max_hops": (["--max_hops=0", "--metrics=all"], ["--max_hops=0", "must be >= 1"]),
    "probe_steps": (["--probe_steps=0", "--task=probes", "--metrics=all"], ["--probe_steps=0", "must be >= 1"]),
    "eval_steps_zero": (["--eval_steps=0"], ["--eval_steps=0", "must be >= 1", "run's default"]),
    "eval_steps_negative": (["--eval_steps=-3"], ["--eval_steps=-3", "must be >= 1"]),
}


def _files(root) -> dict[str, str]:
  """relative path -> sha256 of every file under root."""
  import hashlib
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def eval_flag_mistakes(tmp_path_factory):
  """Each case's finished `nextlat eval` on its own copy of one saved quickstart run (GPT, checkpoint 1, no
  train step), with the copy's files before; the processes run at the same time."""
  import shutil

  from tests.test_load_run import _run
  saved = tmp_path_factory.mktemp("eval_flags_run")
  _run(saved, "gpt", steps=1)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=CPU_FAST_COMPILE)
  procs = {}
  for name, (args, _) in EVAL_FLAG_MISTAKES.items():
    workdir = tmp_path_factory.mktemp("eval_flags") / name
    shutil.copytree(saved, workdir)
    cmd = [sys.executable, "-m", "nextlat_jax.cli", "eval", f"--workdir={workdir}", *args]
    procs[name] = (workdir, _files(workdir), subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  out = {}
  for name, (workdir, before, proc) in procs.items():
    try:
      stdout, stderr = proc.communicate(timeout=120)  # a refused flag exits in seconds
    except subprocess.TimeoutExpired:
      proc.kill()
      stdout, stderr = proc.communicate()
      stderr += "\n(killed after 120 s: the flag was not refused up front)"
    out[name] = (proc.returncode, stdout, stderr, before, _files(workdir))
  return out


@pytest.mark.parametrize("name", list(EVAL_FLAG_MISTAKES))
def test_eval_flag_mistake_is_one_line_before_loading_and_writes_nothing(eval_flag_mistakes, name: str):
  rc, stdout, stderr, before, after = eval_flag_mistakes[name]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert rc == 2, stderr[-3000:]
  assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]  # no log lines: nothing was loaded
  for part in EVAL_FLAG_MISTAKES[name][1]:
    assert part in lines[0], (part, lines[0])
  assert stdout == ""  # no held-out result
  assert any(k.startswith("checkpoints/1/") for k in before), sorted(before)
  assert after == before  # nothing written, nothing changed (no eval_1.json, no eval/)
