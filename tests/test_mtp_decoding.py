"""MTP decoding: the cached MTP model (trunk blocks + every head, K/V for each) against the objective's own
forward, drafts from heads 1..d, lossless speculative decoding (greedy equality) and a restored run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax.config import base_config
from nextlat_jax.data import packing
from nextlat_jax.decoding import draft_policies as dp
from nextlat_jax.decoding import generate as gen
from nextlat_jax.decoding import head_drafters as hd
from nextlat_jax.decoding import speculative as spec
from nextlat_jax.models.transformer import ModelConfig
from nextlat_jax.objectives import build, mtp

V, D, EOS, HORIZON = 16, 32, 1, 2
B, P, NEW = 16, 6, 12
GREEDY = gen.Sampling(0.0)


@pytest.fixture(scope="module")
def model():
  c = base_config()
  c.model.update(vocab_size=V, d_model=D, n_layer=3, n_head=2, init_std=0.2)
  c.objective.update(name="mtp", horizon=HORIZON)
  c.data = ml_collections.ConfigDict({"eos_id": EOS})
  obj = build(c, None)
  params = nn.unbox(obj.init(jax.random.PRNGKey(0)))
  cfg = ModelConfig.from_config(c.model)
  return cfg, obj, params


def _head_logits(obj, params, x_BxT, seg_BxT, pos_BxT):
  z = obj.modules["trunk"].apply({"params": params["trunk"]}, x_BxT, seg_BxT, pos_BxT)[0]
  hs = obj.modules["heads"].apply({"params": params["heads"]}, z, seg_BxT, pos_BxT)
  return jnp.stack([jnp.einsum("btd,dv->btv", h, params["trunk"]["head"]) for h in hs], axis=2)


def _all_head_logits(obj, params, tokens_BxT):
  """(B, T, d+1, V): every head's logits at every position, from the objective's modules."""
  seg, pos = packing.segment_ids_and_positions(tokens_BxT, EOS)
  return _head_logits(obj, params, jnp.asarray(tokens_BxT), seg, pos)


def _prompts(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, V, (B, P)).astype(np.int32)
  tokens[0, 2] = EOS  # a document boundary inside one prompt
  return tokens, np.full((B,), P, np.int32)


def test_cached_model_equals_the_objective_forward(model):
  cfg, obj, params = model
  tokens, lengths = _prompts(0)
  head = hd.mtp_head(cfg, HORIZON + 1)
  cache, h = jax.jit(gen.start, static_argnames=("cfg", "size", "use_cache", "head", "eos_id"))(
      params, cfg, jnp.asarray(tokens[:, :4]), jnp.full((B,), 4), jax.random.PRNGKey(0), sampling=GREEDY,
      eos_id=EOS, size=16, use_cache=True, head=head)[:2]
  # append the last two tokens as a block through the cached call
  h2, _ = jax.jit(head.extend, static_argnums=(1, 4))(params, cfg, cache, jnp.asarray(tokens[:, 4:]), EOS)
  ref = jax.jit(lambda p, t: _all_head_logits(obj, p, t))(params, jnp.asarray(tokens))
  ours = jnp.stack([jnp.einsum("btd,dv->btv", h2[..., i * D:(i + 1) * D], params["trunk"]["head"])
                    for i in range(HORIZON + 1)], axis=2)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref[:, 4:]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(head.logits(params, h, None)), np.asarray(ref[:, 3, 0]), atol=2e-5)
  # the objective's drafting function agrees at the last position
  seg, pos = packing.segment_ids_and_positions(tokens, EOS)
  drafts = jax.jit(lambda p, x, seg, pos: mtp.draft_logits(
      obj.modules, p, obj.modules["trunk"].apply({"params": p["trunk"]}, x, seg, pos)[0], seg, pos))
  np.testing.assert_allclose(np.asarray(drafts(params, jnp.asarray(tokens), seg, pos)),
                             np.asarray(ref[:, -1]), atol=2e-5)


def test_autoregressive_equals_a_naive_full_forward_loop(model):
  cfg, obj, params = model
  tokens, lengths = _prompts(1)
  out = gen.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), cfg=cfg,
                         sampling=GREEDY, max_new=NEW, eos_id=EOS, stop_at_eos=False,
                         head=hd.mtp_head(cfg, HORIZON + 1))
  # A full forward over the whole sequence for every new token. The row is laid out at its final length
  # (filler 2, not EOS, after the current end) so one compile serves every step: with causal attention and
  # prefix-only segment ids / positions, the logits at t - 1 do not see the filler.
  forward = jax.jit(lambda p, x, seg, pos: _head_logits(obj, p, x, seg, pos))
  seq = np.full((B, P + NEW), 2, np.int32)
  seq[:, :P] = tokens
  for t in range(P, P + NEW):
    seg, pos = packing.segment_ids_and_positions(seq, EOS)
    seq[:, t] = np.asarray(jnp.argmax(forward(params, jnp.asarray(seq), seg, pos)[:, t - 1, 0], -1), np.int32)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxM)[:, :NEW], seq[:, P:])


@pytest.mark.parametrize("mode,gamma", [("A", 2), ("A", 3), ("B", 1), ("B", 2)])
def test_speculative_greedy_equals_autoregressive(model, mode, gamma):
  cfg, _, params = model
  tokens, lengths = _prompts(3)
  head = hd.mtp_head(cfg, HORIZON + 1)
  ar = gen.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), cfg=cfg,
                        sampling=GREEDY, max_new=NEW, eos_id=EOS, stop_at_eos=False, head=head)
  gamma_max = HORIZON + 1 if mode == "A" else HORIZON
  out = spec.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(5),
                          dp.DraftPolicy("fixed", gamma=gamma, gamma_max=gamma_max).arrays(), cfg=cfg,
                          drafter=hd.mtp_drafter(cfg, HORIZON + 1), sampling=GREEDY, max_new=NEW,
                          gamma_max=gamma_max, eos_id=EOS, stop_at_eos=False, mode=mode, head=head)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxM), np.asarray(ar.tokens_BxM))
  assert int(np.sum(out.stats["drafted"])) > 0


def test_the_no_cache_baseline_is_refused(model):
  cfg, _, params = model
  tokens, lengths = _prompts(0)
  with pytest.raises(ValueError, match="mtp: decoding needs the KV cache"):
    gen.generate(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0), cfg=cfg,
                 sampling=GREEDY, max_new=2, eos_id=EOS, use_cache=False, head=hd.mtp_head(cfg, HORIZON + 1))


def test_a_restored_mtp_run_decodes(tmp_path):
  from nextlat_jax.decoding import cli
  from nextlat_jax.run import load_run
  from tests.test_decoding import _checkpoint
  _checkpoint(tmp_path, name="mtp", horizon=2)
  run = load_run(str(tmp_path))
  assert cli.head(run).name == "mtp" and cli.drafter(run).max_drafts == 2
  tok = run.tokenizer
  prompts = [[int(t) for t in tok.encode(p)] for p in ("3 17", "40 2 N E", "end 5")]
  ar = cli.decode(run, prompts, jax.random.PRNGKey(0), GREEDY, 10)
  sp = cli.decode(run, prompts, jax.random.PRNGKey(0), GREEDY, 10, speculative_mode="A",
                  policy=dp.DraftPolicy(gamma=3), gamma_max=3)
  np.testing.assert_array_equal(np.asarray(sp.tokens_BxM), np.asarray(ar.tokens_BxM))
