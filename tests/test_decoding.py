"""KV cache, generation and self-speculative decoding: exactness against the full forward, losslessness
(greedy: token for token; sampling: chi-square against the exact autoregressive law), rollback, batching,
EOS, and decoding a restored checkpoint on a mesh and through the CLI."""
import dataclasses
import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax.data import packing
from nextlat_jax.decoding import draft_policies as dp
from nextlat_jax.decoding import generate as gen
from nextlat_jax.decoding import kv_cache as kc
from nextlat_jax.decoding import speculative as spec
from nextlat_jax.models.dynamics import Dynamics
from nextlat_jax.models.transformer import ModelConfig, Transformer

V, D, EOS = 16, 32, 1
B, P, NEW, GAMMA_MAX = 256, 8, 24, 6  # every decoding test shares these shapes, so compiles are shared
ALPHA_Z = 3.090  # one-sided normal quantile of the significance level alpha = 0.001
GREEDY = gen.Sampling(0.0)
MODES = (("A", (1, 3, GAMMA_MAX)), ("B", (GAMMA_MAX + 1,)))  # verify-call sizes: a few in A, one in B
POLICIES = ([dp.DraftPolicy("fixed", gamma=g) for g in range(1, 7)]
            + [dp.DraftPolicy("confidence", gamma=6, threshold=0.4),
               dp.DraftPolicy("cumulative", gamma=6, threshold=0.2), dp.DraftPolicy("adaptive", gamma=2, gamma_max=6)])
extend_jit = jax.jit(kc.extend, static_argnames="cfg")
prefill_jit = jax.jit(kc.prefill, static_argnames=("cfg", "size", "keep_kv"))


def _model(scan: bool = True, seed: int = 0):
  """A tiny random NextLat model with peaked (init std 0.2) distributions, so drafts get rejected."""
  cfg = ModelConfig(vocab_size=V, d_model=D, n_layer=2, n_head=2, init_std=0.2, scan_layers=scan)
  trunk = Transformer(cfg)
  dyn = Dynamics(d_model=D, hidden=64, init_std=0.2)
  x, z = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1, D))
  params = {"trunk": nn.unbox(trunk.init(jax.random.PRNGKey(seed), x, x, x)["params"]),
            "dynamics": nn.unbox(dyn.init(jax.random.PRNGKey(seed + 1), z, z)["params"])}
  return cfg, trunk, params, spec.nextlat_drafter(dyn, cfg)


@pytest.fixture(scope="module")
def model():
  return _model()


_APPLY = {}


def _full_h(trunk, params, tokens_BxT):
  """h of Transformer.__call__ on packed rows (documents split at EOS as in the batch contract)."""
  seg, pos = packing.segment_ids_and_positions(np.asarray(tokens_BxT), EOS)
  if id(trunk) not in _APPLY:
    _APPLY[id(trunk)] = jax.jit(lambda p, x, s, t: trunk.apply({"params": p}, x, s, t)[0])
  return np.asarray(_APPLY[id(trunk)](params["trunk"], jnp.asarray(tokens_BxT), seg, pos))


def _prompts(seed: int, B: int = B, P: int = P):
  """Random right-padded prompts of lengths 1..P, some with an EOS inside or at the end."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(0, V, rng.integers(1, P + 1))) for _ in range(B)]
  prompts[1][-1] = EOS
  return gen.pad_prompts(prompts, minimum=P)


@pytest.mark.parametrize("scan", [True, False])
def test_prefill_and_incremental_equal_full_forward(scan, model):
  cfg, trunk, params, _ = model if scan else _model(scan)
  tokens = np.array(jax.random.randint(jax.random.PRNGKey(3), (3, 12), 0, V), np.int32)
  tokens[0, 4], tokens[2, 0], tokens[2, 9] = EOS, EOS, EOS  # documents restart inside rows
  full = _full_h(trunk, params, tokens)
  seg, pos = packing.segment_ids_and_positions(tokens, EOS)
  lengths = jnp.array([12, 7, 12])
  h, cache = prefill_jit(params["trunk"], cfg, jnp.asarray(tokens), lengths, EOS, 20)
  for b, n in enumerate([12, 7, 12]):
    np.testing.assert_allclose(np.asarray(h)[b, :n], full[b, :n], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.segment_BxS)[b, :n], seg[b, :n])
    np.testing.assert_array_equal(np.asarray(cache.position_BxS)[b, :n], pos[b, :n])
  assert np.asarray(cache.length_B).tolist() == [12, 7, 12]
  if not scan:
    return
  cache, hs = kc.init_cache(cfg, 3, 16), []
  for t in range(12):  # token by token
    h, cache = extend_jit(params["trunk"], cfg, cache, jnp.asarray(tokens[:, t:t + 1]), EOS)
    hs.append(np.asarray(h))
  np.testing.assert_allclose(np.concatenate(hs, axis=1), full, atol=1e-5)


def test_cache_after_rollbacks_equals_fresh_prefill(model):
  """After generation, every rolled-back cache equals a fresh prefill of prompt + emitted tokens but the
  last (the pending one); EOS does not stop rows here, so no row holds drafts past an emitted EOS."""
  cfg, _, params, drafter = model
  prompt, lengths = _prompts(4)
  key = jax.random.PRNGKey(2)
  kw = dict(cfg=cfg, max_new=NEW, eos_id=EOS, stop_at_eos=False, limit_B=np.full(B, NEW, np.int32))
  out = spec.generate_jit(params, prompt, lengths, key, POLICIES[-1].arrays(), drafter=drafter, sampling=GREEDY,
                          gamma_max=GAMMA_MAX, mode="A", verify_sizes=MODES[0][1], **kw)
  rounds, accepted = np.asarray(out.stats["rounds"]), np.asarray(out.stats["accepted"])
  assert (accepted < np.asarray(out.stats["drafted"])).mean() > 0.9  # rows with rejections
  # accounting (mode A): the first token, then per round 1 exact + a accepted + 1 corrected / bonus token;
  # a last exact token alone when it reaches the limit
  assert set(NEW - 1 - 2 * rounds - accepted) <= {0, 1}
  cache, emitted = out.cache, np.asarray(out.tokens_BxM)
  length = lengths + NEW - 1
  assert np.asarray(cache.length_B).tolist() == length.tolist()
  tokens = np.asarray(cache.tokens_BxS)
  for b in range(B):
    np.testing.assert_array_equal(tokens[b, :lengths[b]], prompt[b, :lengths[b]])
    np.testing.assert_array_equal(tokens[b, lengths[b]:length[b]], emitted[b, :-1])
  _, fresh = prefill_jit(params["trunk"], cfg, jnp.asarray(tokens), jnp.asarray(length), EOS, tokens.shape[1])
  valid_BxS = np.arange(tokens.shape[1])[None] < length[:, None]
  for name in ("k_LxBxSxNxH", "v_LxBxSxNxH"):
    got, want = np.asarray(getattr(cache, name)), np.asarray(getattr(fresh, name))
    np.testing.assert_allclose(got[:, valid_BxS], want[:, valid_BxS], atol=1e-5)
  for name in ("segment_BxS", "position_BxS"):
    np.testing.assert_array_equal(np.asarray(getattr(cache, name))[valid_BxS],
                                  np.asarray(getattr(fresh, name))[valid_BxS])
  np.testing.assert_array_equal(np.asarray(fresh.length_B), length)


def test_sampling_transforms_match_numpy():
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 12))) * 2
  for t, k, p in [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.6), (0.5, 5, 0.8), (0.0, 0, 1.0)]:
    got = np.asarray(gen.probs(jnp.asarray(logits), gen.Sampling(t, k, p)))
    for row, g in zip(logits, got):
      if t == 0:
        np.testing.assert_array_equal(g, np.eye(12)[np.argmax(row)])
        continue
      z = row / t
      keep = np.ones(12, bool) if k == 0 else z >= np.sort(z)[-k]
      q = np.where(keep, np.exp(z - z.max()), 0)
      q /= q.sum()
      order = np.argsort(-q)
      n_keep = int(np.sum(np.cumsum(q[order]) - q[order] < p))
      q = np.where(np.isin(np.arange(12), order[:n_keep]), q, 0)
      np.testing.assert_allclose(g, q / q.sum(), atol=1e-6)


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float, float]:
  """Pearson chi-square at alpha = 0.001 (Wilson-Hilferty critical value), cells with expected < 5 pooled."""
  n = counts.sum()
  if np.sum(probs > 0) == 1:  # a point mass: every sample must be that token
    return bool(counts[probs > 0].sum() == n), 0.0, 0.0
  expected = probs * n
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  stat = float(np.sum((obs - exp) ** 2 / exp))
  k = len(obs) - 1
  crit = k * (1 - 2 / (9 * k) + ALPHA_Z * np.sqrt(2 / (9 * k))) ** 3
  return stat < crit, stat, crit


def test_accept_kernel_output_law_is_p():
  rng = np.random.default_rng(0)
  cases = [(rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))) for _ in range(2)]
  p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
  q[[0, 3]] = 0
  cases += [(p, q / q.sum()), (p, p), (np.eye(8)[2], np.eye(8)[5]), (np.eye(8)[4], np.eye(8)[4])]
  n = 100_000
  run = jax.jit(lambda key, p, q, d: spec.accept(key, p, q, d, jnp.ones((n,), jnp.int32)))
  for i, (p, q) in enumerate(cases):
    beta = np.minimum(p, q).sum()
    residual = np.maximum(p - q, 0)
    law = q * np.minimum(1, np.divide(p, q, out=np.ones_like(p), where=q > 0)) + (
        (1 - beta) * residual / residual.sum() if residual.sum() > 0 else 0)
    np.testing.assert_allclose(law, p, atol=1e-6)
    k_d, k_a = jax.random.split(jax.random.PRNGKey(i))
    drafts = jax.random.choice(k_d, 8, (n, 1), p=jnp.asarray(q))
    pb = jnp.broadcast_to(jnp.asarray(np.stack([p, p]), jnp.float32), (n, 2, 8))
    qb = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 1, 8))
    k, x, _ = run(k_a, pb, qb, drafts)
    out = np.where(np.asarray(k) == 1, np.asarray(drafts)[:, 0], np.asarray(x))
    ok, stat, crit = _chi2_ok(np.bincount(out, minlength=8), p)
    assert ok, (i, stat, crit)


def test_greedy_speculative_equals_autoregressive(model):
  cfg, _, params, drafter = model
  prompt, lengths = _prompts(1)
  key = jax.random.PRNGKey(0)
  kw = dict(cfg=cfg, max_new=NEW, eos_id=EOS, stop_at_eos=True, limit_B=np.full(B, NEW, np.int32))
  ar = gen.generate_jit(params, prompt, lengths, key, sampling=GREEDY, **kw)
  ar_tokens = np.asarray(ar.tokens_BxM)
  assert 0 < np.asarray(ar.lengths_B).min() < NEW <= np.asarray(ar.lengths_B).max()  # EOS stops some rows
  zero_dyn = dict(params, dynamics=jax.tree.map(jnp.zeros_like, params["dynamics"]))  # another drafter
  accepted, drafted = 0, 0
  for mode, sizes in MODES:
    for pol, p in [(pol, params) for pol in POLICIES] + [(POLICIES[-1], zero_dyn)]:
      out = spec.generate_jit(p, prompt, lengths, key, pol.arrays(), drafter=drafter, sampling=GREEDY,
                              gamma_max=GAMMA_MAX, mode=mode, verify_sizes=sizes, **kw)
      np.testing.assert_array_equal(np.asarray(out.tokens_BxM), ar_tokens, err_msg=f"{mode} {pol}")
      np.testing.assert_array_equal(np.asarray(out.lengths_B), np.asarray(ar.lengths_B))
      a, d = int(np.asarray(out.stats["accepted"]).sum()), int(np.asarray(out.stats["drafted"]).sum())
      assert a <= d
      accepted, drafted = accepted + a, drafted + d
  assert 0 < accepted < drafted  # both acceptances and rejections were exercised
  # the paper's no-cache harness gives the same tokens
  nc = spec.generate_jit(params, prompt, lengths, key, POLICIES[3].arrays(), drafter=drafter, sampling=GREEDY,
                         gamma_max=GAMMA_MAX, mode="A", use_cache=False, **kw)
  np.testing.assert_array_equal(np.asarray(nc.tokens_BxM), ar_tokens)

  # batched == per sequence: a row's tokens do not depend on the other rows (reversed, or half replaced);
  # one compiled width serves both, so no separate batch-1 program is compiled here
  other, other_len = _prompts(7)
  order, half = np.arange(B)[::-1], B // 2
  mixed = np.concatenate([prompt[order[:half]], other[half:]])
  mixed_len = np.concatenate([lengths[order[:half]], other_len[half:]])
  for p, l, pol in ((prompt[order], lengths[order], POLICIES[-1]), (mixed, mixed_len, POLICIES[-2])):
    out = gen.generate_jit(params, p, l, key, sampling=GREEDY, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxM)[:half], ar_tokens[order[:half]])
    out = spec.generate_jit(params, p, l, key, pol.arrays(), drafter=drafter, sampling=GREEDY, gamma_max=GAMMA_MAX,
                            mode="A", verify_sizes=MODES[0][1], **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxM)[:half], ar_tokens[order[:half]])


def test_eos_and_limits_stop_a_sequence(model):
  cfg, _, params, drafter = model
  prompt, lengths = _prompts(2)
  key = jax.random.PRNGKey(1)
  limit = np.random.default_rng(0).integers(3, NEW + 1, B).astype(np.int32)
  kw = dict(cfg=cfg, sampling=GREEDY, max_new=NEW)
  run = lambda eos, stop, lim: gen.generate_jit(params, prompt, lengths, key, eos_id=eos, stop_at_eos=stop, limit_B=lim,
                                                **kw)
  free = np.asarray(run(EOS, False, np.full(B, NEW, np.int32)).tokens_BxM)
  eos = int(np.bincount(free[:, 3:].ravel(), minlength=V).argmax())  # a token that many rows emit
  free = np.asarray(run(eos, False, np.full(B, NEW, np.int32)).tokens_BxM)
  outs = [run(eos, True, limit),
          spec.generate_jit(params, prompt, lengths, key, POLICIES[3].arrays(), drafter=drafter, gamma_max=GAMMA_MAX,
                            mode="A", verify_sizes=MODES[0][1], eos_id=eos, stop_at_eos=True, limit_B=limit, **kw)]
  stopped = 0
  for out in outs:
    tokens, n = np.asarray(out.tokens_BxM), np.asarray(out.lengths_B)
    for b in range(B):
      hits = np.flatnonzero(free[b] == eos)
      want = min(hits[0] + 1 if len(hits) else NEW, limit[b])
      stopped += len(hits) and hits[0] + 1 < limit[b]
      assert n[b] == want
      np.testing.assert_array_equal(tokens[b, :want], free[b, :want])
      assert (tokens[b, want:] == 0).all()
  assert stopped >= 20


def _exact_law(trunk, params, prompt: list[int], n: int) -> np.ndarray:
  """The autoregressive (T = 1) joint law of the first n new tokens, shape (V,) * n."""
  seqs = np.array([prompt + list(c) for c in itertools.product(range(V), repeat=n - 1)], np.int32)
  logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", _full_h(trunk, params, seqs), params["trunk"]["head"]))
  logp = np.asarray(logp)[:, len(prompt) - 1:]  # (V^(n-1), n, V): step i's distribution given the prefix
  law = np.zeros((V,) * n)
  for idx, c in enumerate(itertools.product(range(V), repeat=n - 1)):
    head = sum(logp[idx, i, c[i]] for i in range(n - 1))
    law[c] = np.exp(head + logp[idx, n - 1])
  return law


def test_sampled_distribution_matches_autoregressive(model):
  """First 3 tokens of N = 8192 samples vs the exact AR law (V^3 cells), at T = 1, alpha = 0.001."""
  cfg, trunk, params, drafter = model
  prompt = [5, 9, 2]
  law = _exact_law(trunk, params, prompt, 3)
  assert abs(law.sum() - 1) < 1e-4
  prompts, lengths = gen.pad_prompts([prompt] * B, minimum=P)
  kw = dict(cfg=cfg, sampling=gen.Sampling(1.0), max_new=NEW, eos_id=EOS, stop_at_eos=False,
            limit_B=np.full(B, 6, np.int32))  # 6 tokens: enough for drafts to produce tokens 2 and 3
  arms = {"AR": lambda k: gen.generate_jit(params, prompts, lengths, k, **kw)}
  for (mode, sizes), gamma in zip(MODES, (4, 3)):
    arms[mode] = lambda k, mode=mode, sizes=sizes, pol=dp.DraftPolicy("fixed", gamma=gamma): spec.generate_jit(
        params, prompts, lengths, k, pol.arrays(), drafter=drafter, gamma_max=GAMMA_MAX, mode=mode,
        verify_sizes=sizes, **kw)  # the same call signature as the greedy test, so the same compile
  for name, fn in arms.items():
    outs = [fn(jax.random.PRNGKey(i)) for i in range(32)]
    x = np.concatenate([np.asarray(o.tokens_BxM)[:, :3] for o in outs])
    counts = np.bincount(np.ravel_multi_index(x.T, (V,) * 3), minlength=V ** 3)
    ok, stat, crit = _chi2_ok(counts, law.ravel())
    assert ok, (name, "joint", stat, crit)
    for i in range(3):
      marginal = law.sum(axis=tuple(j for j in range(3) if j != i))
      ok, stat, crit = _chi2_ok(np.bincount(x[:, i], minlength=V), marginal)
      assert ok, (name, i, stat, crit)
    if name != "AR":
      rate = sum(np.asarray(o.stats["accepted"]).sum() for o in outs) / sum(
          np.asarray(o.stats["drafted"]).sum() for o in outs)
      assert 0.05 < rate < 0.95, (name, rate)  # both branches of the rule were exercised


def _checkpoint(tmp_path, **objective):
  """A resolved tiny street-grid run (NextLat unless `objective` says otherwise) saved as a checkpoint
  (no training needed)."""
  from configs import quickstart
  from nextlat_jax.data import pipeline
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import checkpoint, preflight
  from nextlat_jax.train import step as step_lib
  c = quickstart.get_config()
  c.model.update(n_layer=2, d_model=32, n_head=2, init_std=0.2)
  c.dynamics.hidden = 64
  c.data.seq_len = 32
  c.batch_size = 8
  c.objective.update(objective)
  config, _ = preflight.resolve(c)
  setup = step_lib.build(config, make_mesh(config.mesh))
  state = setup.init(jax.random.PRNGKey(0))
  ds = pipeline.make_dataset(config.data, split="train", global_batch_size=8, seed=0, process_index=0,
                             process_count=1)
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"), config.checkpoint)
  checkpoint.save(mgr, 1, state, pipeline.BatchIterator(ds, 1, {}), config, force=True)
  mgr.wait_until_finished()
  return config


def test_restored_checkpoint_on_meshes_and_cli(tmp_path, capsys, monkeypatch):
  from absl import flags

  import nextlat_jax.cli  # noqa: F401  (defines --workdir and --step)
  from nextlat_jax.decoding import cli
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.run import load_run
  from nextlat_jax.train import checkpoint
  from nextlat_jax.train import step as step_lib
  config = _checkpoint(tmp_path)
  run = load_run(str(tmp_path))  # all 8 devices on `data`
  assert run.step == 1 and cli.drafter(run) is not None
  tok = run.tokenizer
  prompts = [[int(t) for t in tok.encode(p)] for p in ("3 17", "40 2 N E", "end 5")]
  key = jax.random.PRNGKey(0)
  ar = cli.decode(run, prompts, key, GREEDY, 12)
  sp = cli.decode(run, prompts, key, GREEDY, 12, speculative_mode="A", policy=dp.DraftPolicy(gamma=2), gamma_max=2)
  np.testing.assert_array_equal(np.asarray(sp.tokens_BxM), np.asarray(ar.tokens_BxM))
  # parameters sharded over fsdp x tensor give the same tokens
  sharded = ml_collections.ConfigDict(config.to_dict())
  sharded.mesh.update(data=2, fsdp=2, tensor=2)
  setup = step_lib.build(sharded, make_mesh(sharded.mesh))
  params, _ = checkpoint.restore_params(str(tmp_path / "checkpoints"), setup.abstract_state.params)
  assert params["trunk"]["blocks"]["qkv"]["kernel"].sharding.mesh.devices.size == 8
  run = dataclasses.replace(run, params=params)
  out = cli.decode(run, prompts, key, GREEDY, 12)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxM), np.asarray(ar.tokens_BxM))

  argv = ["nextlat generate", f"--workdir={tmp_path}", "--prompt=3 17", "--prompt=40 2 N E", "--prompt=end 5",
          "--temperature=0", "--max_new_tokens=12", "--speculative", "--gamma=2", "--gamma_max=2"]
  flags.FLAGS(argv)
  try:
    cli.generate(argv)
  finally:
    flags.FLAGS.unparse_flags()
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  assert [line["prompt"] for line in lines[:3]] == ["3 17", "40 2 N E", "end 5"]
  for line, row, n in zip(lines, np.asarray(ar.tokens_BxM), np.asarray(ar.lengths_B)):
    assert line["output_ids"] == row[:n].tolist()
    assert line["output"] == " ".join(tok.decode(row[:n]))
    assert line["text"] == " ".join(tok.decode(line["prompt_ids"] + line["output_ids"]))
    assert line["new_tokens"] == n and line["tokens_per_sec"] > 0 and line["rounds"] >= 1
  assert lines[3]["rounds"] > 0 and lines[3]["mode"] == "A"
  assert lines[3]["rounds"] == sum(line["rounds"] for line in lines[:3])
  assert lines[3]["tokens"] == sum(line["new_tokens"] for line in lines[:3])
  assert 0 <= lines[3]["accepted_per_round"] <= 1  # gamma 2 in mode A: at most one drafted token per round
  assert lines[3]["tokens_per_round"] == pytest.approx(lines[3]["tokens"] / lines[3]["rounds"])
  # this process compiled the same program for `sp` above, so lower+compile may be a cache hit (0.0 s)
  assert lines[3]["tokens_per_sec"] > 0 and lines[3]["compile_s"] >= 0
  # bad prompts are refused from the saved config, before the parameters are read
  from absl import app

  def refuse(*args, **kwargs):
    raise AssertionError("generate loaded the run before checking its prompts")
  monkeypatch.setattr(cli, "load_run", refuse)
  for bad, why in (("--prompt=3 hello", "unknown word 'hello'"), ("--prompt_ids=1,99999", "token 99999 is outside")):
    argv = ["nextlat generate", f"--workdir={tmp_path}", bad]
    flags.FLAGS(argv)
    try:
      with pytest.raises(app.UsageError, match=why):
        cli.generate(argv)
    finally:
      flags.FLAGS.unparse_flags()


def test_generate_text_prompt_on_a_bpe_run(capsys):
  """`nextlat generate --prompt=TEXT` on a run whose data names a trained BPE: the JSON line holds the decoded
  prompt, continuation and text, the greedy ids of cli.decode, and tokens/s."""
  from absl import flags

  import nextlat_jax.cli  # noqa: F401  (defines --workdir and --step)
  from nextlat_jax.decoding import cli
  from nextlat_jax.run import load_run
  from tests.text_run import shared_text_run
  run_dir = shared_text_run()
  argv = ["nextlat generate", f"--workdir={run_dir}", "--prompt=In the beginning", "--temperature=0",
          "--max_new_tokens=6", "--nostop_at_eos"]
  flags.FLAGS(argv)
  try:
    cli.generate(argv)
  finally:
    flags.FLAGS.unparse_flags()
  (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
  run = load_run(str(run_dir))
  tok = run.tokenizer
  prompt = tok.encode("In the beginning")
  out = cli.decode(run, [prompt], jax.random.PRNGKey(0), GREEDY, 6, stop_at_eos=False)
  assert line["prompt_ids"] == prompt and line["output_ids"] == np.asarray(out.tokens_BxM)[0, :6].tolist()
  assert line["prompt"] == "In the beginning" and line["output"] == tok.decode(line["output_ids"])
  assert line["text"] == tok.decode(prompt + line["output_ids"]) and line["text"].startswith("In the beginning")
  assert line["new_tokens"] == 6 and line["tokens_per_sec"] > 0 and line["decode_s"] > 0
