"""JTP decoding: the next-token head through Fetch slot 0 and self-speculative drafting from Fetch's slots,
against the objective's own `draft_logits` and a naive full-forward greedy loop; lossless (greedy equality)
in both modes and for every fixed gamma."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlat_jax.data import packing
from nextlat_jax.decoding import draft_policies as dp
from nextlat_jax.decoding import generate as gen
from nextlat_jax.decoding import head_drafters as hd
from nextlat_jax.decoding import speculative as spec
from nextlat_jax.models.transformer import ModelConfig, Transformer
from nextlat_jax.objectives import jtp

V, D, EOS, HORIZON = 16, 32, 1, 3
B, P, NEW = 16, 6, 12
GREEDY = gen.Sampling(0.0)


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=V, d_model=D, n_layer=2, n_head=2, init_std=0.2)
  trunk = Transformer(cfg)
  fetch = jtp.Fetch(d_model=D, n_heads=2, slots=HORIZON + 1, init_std=0.2)
  x = jnp.zeros((1, 2), jnp.int32)
  params = {"trunk": nn.unbox(trunk.init(jax.random.PRNGKey(0), x, x, x)["params"]),
            "fetch": nn.unbox(fetch.init(jax.random.PRNGKey(1), jnp.zeros((1, 1, D)),
                                         jnp.zeros((1, 1, HORIZON + 1, D)))["params"])}
  # a non-trivial gamma so the combine path matters
  params["fetch"]["gamma"] = jnp.asarray(0.7, jnp.float32)
  apply = jax.jit(lambda p, t, s, q: trunk.apply({"params": p}, t, s, q)[0])
  return cfg, fetch, params, apply


def _h(apply, params, tokens_BxT):
  seg, pos = packing.segment_ids_and_positions(np.asarray(tokens_BxT), EOS)
  return apply(params["trunk"], jnp.asarray(tokens_BxT), seg, pos)


def _prompts(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, V, (B, P)).astype(np.int32)  # no EOS: one document per row
  return tokens, np.full((B,), P, np.int32)


def test_head_is_fetch_slot0(model):
  cfg, fetch, params, apply = model
  tokens, _ = _prompts(0)
  h_BxTxD = _h(apply, params, tokens)
  ours = hd.jtp_head(fetch, cfg).logits(params, h_BxTxD, jnp.asarray(tokens))
  for t in (0, P - 1):
    ref = jtp.draft_logits({"fetch": fetch}, params, h_BxTxD[:, t], jnp.asarray(tokens[:, t]),
                           jnp.zeros((B, 0), jnp.int32))[:, 0]
    np.testing.assert_allclose(np.asarray(ours[:, t]), np.asarray(ref), atol=1e-5)


def test_autoregressive_equals_a_naive_full_forward_loop(model):
  cfg, fetch, params, apply = model
  tokens, lengths = _prompts(1)
  out = gen.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), cfg=cfg,
                         sampling=GREEDY, max_new=NEW, eos_id=EOS, stop_at_eos=False,
                         head=hd.jtp_head(fetch, cfg))
  # One compile: the rows are padded to their final length with a non-EOS filler; attention is causal,
  # so h at the last real token does not see the filler.
  seq = np.concatenate([tokens, np.full((B, NEW), 2, np.int32)], axis=1)
  for t in range(P, P + NEW):
    h = _h(apply, params, seq)
    logits = jtp.draft_logits({"fetch": fetch}, params, h[:, t - 1], jnp.asarray(seq[:, t - 1]),
                              jnp.zeros((B, 0), jnp.int32))[:, 0]
    seq[:, t] = np.asarray(jnp.argmax(logits, -1), np.int32)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxM)[:, :NEW], seq[:, P:])


def test_drafts_come_from_the_fetch_slots(model):
  """Draft j's distribution is slot j+1 of draft_logits fed [x_prev, pending, drafts 0..j-1]."""
  cfg, fetch, params, apply = model
  tokens, _ = _prompts(2)
  h_BxD = _h(apply, params, tokens)[:, -1]
  x_prev, pending = jnp.asarray(tokens[:, -1]), jnp.asarray(np.arange(B) % V, jnp.int32)
  policy = dp.DraftPolicy("fixed", gamma=HORIZON).arrays()
  drafts, q, n = spec.draft(hd.jtp_drafter(fetch, cfg), params, h_BxD, x_prev, pending,
                            jnp.full((B,), HORIZON + 5), jax.random.PRNGKey(3), sampling=gen.Sampling(1.0),
                            policy=policy, gamma_max=HORIZON + 2)
  assert np.all(np.asarray(n) == HORIZON)  # at most d drafts, whatever the cap
  ref = jtp.draft_logits({"fetch": fetch}, params, h_BxD, x_prev,
                         jnp.concatenate([pending[:, None], drafts[:, :HORIZON - 1]], axis=1))
  np.testing.assert_allclose(np.asarray(q[:, :HORIZON]), np.asarray(jax.nn.softmax(ref[:, 1:], -1)), atol=1e-5)


@pytest.mark.parametrize("mode,gamma", [("A", 2), ("A", 4), ("B", 1), ("B", 3)])
def test_speculative_greedy_equals_autoregressive(model, mode, gamma):
  cfg, fetch, params, _ = model
  tokens, lengths = _prompts(3)
  head = hd.jtp_head(fetch, cfg)
  ar = gen.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), cfg=cfg,
                        sampling=GREEDY, max_new=NEW, eos_id=EOS, stop_at_eos=False, head=head)
  gamma_max = HORIZON + 1 if mode == "A" else HORIZON
  out = spec.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(5),
                          dp.DraftPolicy("fixed", gamma=gamma, gamma_max=gamma_max).arrays(), cfg=cfg,
                          drafter=hd.jtp_drafter(fetch, cfg), sampling=GREEDY, max_new=NEW,
                          gamma_max=gamma_max, eos_id=EOS, stop_at_eos=False, mode=mode, head=head)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxM), np.asarray(ar.tokens_BxM))
  assert int(np.sum(out.stats["drafted"])) > 0


def test_a_restored_jtp_run_decodes_through_fetch(tmp_path):
  """A loaded JTP run decodes through its Fetch head and drafter; speculative == autoregressive (greedy), and
  the first token is the argmax of the objective's own next-token logits. BST runs are refused."""
  from nextlat_jax.decoding import cli
  from nextlat_jax.objectives import build
  from nextlat_jax.run import load_run
  from tests.test_decoding import _checkpoint
  config = _checkpoint(tmp_path / "jtp", name="jtp", horizon=2)
  run = load_run(str(tmp_path / "jtp"))
  assert cli.head(run).name == "jtp" and cli.drafter(run).name == "jtp" and cli.drafter(run).max_drafts == 2
  tok = run.tokenizer
  prompts = [[int(t) for t in tok.encode(p)] for p in ("3 17", "40 2 N E", "end 5")]
  key = jax.random.PRNGKey(0)
  ar = cli.decode(run, prompts, key, GREEDY, 10)
  # mode A here (both modes: test_speculative_greedy_equals_autoregressive, on the same drafter)
  sp = cli.decode(run, prompts, key, GREEDY, 10, speculative_mode="A", policy=dp.DraftPolicy(gamma=2),
                  gamma_max=3)
  np.testing.assert_array_equal(np.asarray(sp.tokens_BxM), np.asarray(ar.tokens_BxM))
  obj = build(config, None)  # no mesh: unconstrained modules for a one-row reference
  x = jnp.asarray([prompts[0]], jnp.int32)
  seg, pos = packing.segment_ids_and_positions(np.asarray(x), run.eos_id)
  h = obj.modules["trunk"].apply({"params": run.params["trunk"]}, x, seg, pos)[0]
  ref = jtp.draft_logits(obj.modules, run.params, h[:, -1], x[:, -1], jnp.zeros((1, 0), jnp.int32))[:, 0]
  assert int(jnp.argmax(ref[0])) == int(ar.tokens_BxM[0, 0])
  _checkpoint(tmp_path / "bst", name="bst")
  with pytest.raises(ValueError, match="objective.name='bst': decoding is not supported"):
    cli.decode(load_run(str(tmp_path / "bst")), prompts, key, GREEDY, 1)
