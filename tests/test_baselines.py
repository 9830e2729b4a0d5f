"""Baselines (BASELINES.md): MTP, DeepSeek-V3 MTP, JTP, BST.

- each loss equals a naive numpy reference (loops over rows, positions, offsets, pairs) on random packed
  rows with prompt masks, EOS crossings and padding, with randomly perturbed parameters so that every
  mask, target and weight matters;
- MTP's two document rules on a hand-built packed row;
- the drafting functions agree with the training-time distributions;
- parameter counts: paper Table 4 (1.3B FineWeb-Edu) within 0.5% and the exact counts of BASELINES.md §7;
- every baseline trains on an 8-device (2, 2, 2) mesh on quickstart data and its loss falls;
- bad config values give their named ConfigError.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextlat_jax import config as config_lib
from nextlat_jax.config import load_config_file
from nextlat_jax import flops, info, objectives
from nextlat_jax.data import packing
from nextlat_jax.models.transformer import Block, ModelConfig, Stack, document_mask
from nextlat_jax.objectives import bst, jtp, mtp, mtp_deepseek


V, EOS, PAD, B, L, D = 11, 1, 0, 4, 13, 16
LAM = 0.7
# These tests compile many small programs; XLA's CPU backend at optimisation level 0 compiles them about
# twice as fast (the numerics are the same operations, unfused differently).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def make_config(name, horizon=2, **objective):
  c = config_lib.base_config()
  c.model.update(vocab_size=V, d_model=D, n_layer=2, n_head=4, ffn_width=32)
  c.data = ml_collections.ConfigDict(dict(eos_id=EOS))
  c.objective.update(dict(name=name, horizon=horizon, lambda_mtp=LAM), **objective)
  c.batch_size = B
  c.mesh.update(data=1, fsdp=1, tensor=1)
  config_lib.validate(c, 1)
  return c


def random_batch(seed=0):
  """Packed rows: EOS crossings (incl. adjacent EOS), prompt masks (context_length 1), tail padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, V, size=(B, L))
  tokens[rng.random((B, L)) < 0.2] = EOS
  tokens[0, 4] = tokens[0, 5] = tokens[2, 3] = tokens[2, 7] = EOS
  valid = np.ones((B, L), bool)
  valid[1, L - 3:] = valid[3, L - 1:] = False
  tokens[~valid] = PAD
  return packing.pack_row_fields(tokens, EOS, context_length=1, valid=valid)


def build(config, seed=0):
  """The objective and random parameters of its shapes (no init compile): norm scales 1 + N(0, 0.3), every
  other leaf N(0, 0.3), so that every mask, target and weight matters."""
  obj = objectives.build(config)
  shapes = nn.unbox(jax.eval_shape(obj.init, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(s.shape), s.dtype)

  return obj, jax.tree_util.tree_map_with_path(draw, shapes)


def np_ce(logits, target):
  logits = np.asarray(logits, np.float64)
  m = logits.max()
  return m + np.log(np.sum(np.exp(logits - m))) - logits[target]


def np_rms(x, w, eps=1e-5):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w)


def mean_or_zero(xs):
  return float(np.mean(xs)) if xs else 0.0


def trunk_h(obj, params, batch, full=False):
  x = batch if full else {k: v[:, :-1] for k, v in batch.items()}
  return jit(obj.modules["trunk"].apply)({"params": params["trunk"]}, x["tokens"], x["segment_ids"],
                                             x["positions"])


# ----------------------------------------------------------------------------------------------- MTP
@pytest.mark.parametrize("rule", ["reference", "intended"])
def test_mtp_loss_matches_reference(rule):
  d = 3
  c = make_config("mtp", d, mtp_eos_mask=rule)
  obj, params = build(c)
  batch = random_batch()
  loss, metrics = jit(obj.loss)(params, batch, jax.random.PRNGKey(0))

  x, lm, seg = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
  assert any(np.any(mtp.target_mask(batch, i, EOS, "reference") != mtp.target_mask(batch, i, EOS, "intended"))
             for i in range(1, d + 1))  # the batch tells the two rules apart
  z, _ = trunk_h(obj, params, batch)
  assert "final_norm" not in params["trunk"]["stack"]  # trunk: n_layer - 1 blocks, no final norm
  assert params["trunk"]["stack"]["blocks"]["mlp_out"]["kernel"].shape[0] == 1
  cfg = ModelConfig.from_config(c.model)
  W = np.asarray(params["trunk"]["head"])
  ces = []
  for i in range(d + 1):
    hp = params["heads"][f"head_{i}"]  # head i = a block + its own RMSNorm
    y, _ = jit(Block(cfg).apply)({"params": hp["block"]}, z, document_mask(seg[:, :-1]),
                                     batch["positions"][:, :-1])
    logits = np_rms(y, hp["norm"]["scale"]) @ W
    terms = []
    for b in range(B):
      for t in range(L - 1 - i):
        j = t + 1 + i
        keep = lm[b, j] == 1 and seg[b, t] >= 0
        if i:
          n = int(np.sum(x[b, t + 1:t + i + 1] == EOS))
          keep &= (n == int(x[b, j] == EOS)) if rule == "reference" else n == 0
        if keep:
          terms.append(np_ce(logits[b, t], x[b, j]))
    ces.append(mean_or_zero(terms))
  expected = ces[0] + LAM * np.mean(ces[1:])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose([float(metrics[f"ce_{i}"]) for i in range(d + 1)], ces, rtol=1e-4)


def test_mtp_document_rules_on_a_hand_built_row():
  """Row 5 6 E 7 E E 8 9 (E = EOS), nothing prompt-masked: head i keeps target x_{t+1+i} iff
  reference: #EOS in x_{t+1..t+i} == [x_{t+1+i} is EOS]; intended: no EOS in x_{t+1..t+i}."""
  row = np.array([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
  batch = packing.pack_row_fields(row, EOS, context_length=None)
  got = lambda i, rule: np.asarray(mtp.target_mask(batch, i, EOS, rule)[0]).astype(int).tolist()
  assert got(1, "reference") == [0, 0, 0, 1, 0, 1]
  assert got(1, "intended") == [1, 0, 1, 0, 0, 1]
  assert got(2, "reference") == [0, 1, 1, 0, 0]
  assert got(2, "intended") == [0, 0, 0, 0, 0]
  assert got(0, "reference") == [1] * 7


def test_mtp_draft_logits_are_the_heads_at_the_last_position():
  c = make_config("mtp", 2)
  obj, params = build(c)
  batch = random_batch(1)
  t = 6  # prefix x_0..x_t
  pre = {k: v[:, :t + 1] for k, v in batch.items()}
  z, _ = trunk_h(obj, params, pre, full=True)
  got = jit(functools.partial(mtp.draft_logits, obj.modules))(params, z, pre["segment_ids"], pre["positions"])
  z_full, _ = trunk_h(obj, params, batch, full=True)  # causal: the prefix states are the same
  hs = jit(obj.modules["heads"].apply)({"params": params["heads"]}, z_full, batch["segment_ids"],
                                           batch["positions"])
  want = np.stack([np.asarray(h[:, t]) @ np.asarray(params["trunk"]["head"]) for h in hs], 1)
  assert got.shape == (B, 3, V)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- DeepSeek MTP
def deepseek_reference(c, obj, params, batch):
  """(loss, per-depth CEs, logits per depth (B, n_k, V)) with every step written out."""
  K, concat, final_norm = c.objective.horizon, c.objective.deepseek_concat, c.objective.deepseek_final_norm
  x, lm, seg, pos = batch["tokens"], batch["loss_mask"], batch["segment_ids"], batch["positions"]
  cfg = ModelConfig.from_config(c.model)
  E, W = np.asarray(params["trunk"]["embed"]), np.asarray(params["trunk"]["head"])
  h, _ = trunk_h(obj, params, batch)
  h = np.asarray(h, np.float64)
  ces, all_logits = [], [h @ W]
  terms = [np_ce(all_logits[0][b, t], x[b, t + 1]) for b in range(B) for t in range(L - 1)
           if lm[b, t + 1] and seg[b, t] >= 0]
  ces.append(mean_or_zero(terms))
  for k in range(1, K + 1):
    p = params["mtp"][f"depth_{k - 1}"]
    n = L - 1 - k
    inp = np.zeros((B, n, D))
    for b in range(B):
      for i in range(n):
        en = np_rms(E[x[b, i + k]], p["embed_norm"]["scale"])
        hn = np_rms(h[b, i], p["hidden_norm"]["scale"])
        inp[b, i] = np.concatenate([en, hn] if concat == "embedding_first" else [hn, en]) @ np.asarray(
            p["proj"]["kernel"])
    y, _ = jit(Block(cfg).apply)({"params": p["block"]}, jnp.asarray(inp, jnp.float32),
                            document_mask(seg[:, :n]), pos[:, :n])
    y = np.asarray(y, np.float64)
    out = np_rms(y, p["final_norm"]["scale"]) if final_norm else y
    logits = out @ W
    all_logits.append(logits)
    terms = [np_ce(logits[b, i], x[b, i + k + 1]) for b in range(B) for i in range(n)
             if lm[b, i + k + 1] and seg[b, i] >= 0 and not np.any(x[b, i + 1:i + k + 1] == EOS)]
    ces.append(mean_or_zero(terms))
    h = y
  return ces[0] + LAM * np.mean(ces[1:]), ces, all_logits


@pytest.mark.parametrize("concat,final_norm", [("embedding_first", True), ("hidden_first", False)])
def test_deepseek_loss_matches_reference(concat, final_norm):
  c = make_config("mtp_deepseek", 2, deepseek_concat=concat, deepseek_final_norm=final_norm)
  obj, params = build(c)
  batch = random_batch(2)
  loss, metrics = jit(obj.loss)(params, batch, jax.random.PRNGKey(0))
  expected, ces, logits = deepseek_reference(c, obj, params, batch)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose([float(metrics["ce"]), float(metrics["ce_1"]), float(metrics["ce_2"])], ces,
                             rtol=1e-4)
  if final_norm:
    # Drafting: prefix x_0..x_t, drafts = the true next tokens -> entry k = module k at position t.
    t = 5
    pre = {k: v[:, :t + 1] for k, v in batch.items()}
    h0, _ = trunk_h(obj, params, pre, full=True)
    got = jit(functools.partial(mtp_deepseek.draft_logits, obj.modules))(
        params, h0, pre["tokens"], pre["segment_ids"], pre["positions"], batch["tokens"][:, t + 1:t + 3])
    want = np.stack([logits[k][:, t] for k in range(3)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- JTP
def jtp_reference(c, obj, params, batch):
  """(loss, per-slot CEs, logits (B, T, S, V)): the Fetch module position by position, slot by slot."""
  d = c.objective.horizon
  S, N = d + 1, min(4, c.model.n_head)
  H = D // N
  x, lm, seg = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
  E, W = np.asarray(params["trunk"]["embed"], np.float64), np.asarray(params["trunk"]["head"], np.float64)
  f = jax.tree.map(lambda a: np.asarray(a, np.float64), params["fetch"])
  qkv, out_k, bias = f["qkv"]["kernel"], f["out"]["kernel"], f["slot_bias"]  # (D,3,N,H), (N,H,D), (N,S,S)
  h, _ = trunk_h(obj, params, batch)
  h = np.asarray(h, np.float64)
  T = L - 1
  logits = np.zeros((B, T, S, V))
  terms = [[] for _ in range(S)]
  for b in range(B):
    for t in range(T):
      toks = [x[b, t]] + [x[b, t + k] if t + k <= L - 1 and lm[b, t + k] else 0 for k in range(1, S)]
      comb = []
      for tok in toks:
        a = E[tok] + f["gamma"] * h[b, t]
        comb.append((a - a.mean()) / np.sqrt(a.var() + 1e-5) * f["combine_scale"] + f["combine_bias"])
      comb = np.stack(comb)  # (S, D)
      q, k_, v = (np.einsum("sd,dnh->snh", comb, qkv[:, j]) for j in range(3))
      o = np.zeros((S, N, H))
      for n in range(N):
        for s in range(S):
          sc = np.array([q[s, n] @ k_[r, n] / np.sqrt(H) + bias[n, s, r] for r in range(s + 1)])
          p = np.exp(sc - sc.max())
          p /= p.sum()
          o[s, n] = sum(p[r] * v[r, n] for r in range(s + 1))
      out = np.einsum("snh,nhd->sd", o, out_k)
      for s in range(S):
        y = np_rms(out[s] + (h[b, t] if s else 0.0), f["norm"]["scale"])
        logits[b, t, s] = y @ W
        j = t + s + 1
        if j > L - 1 or seg[b, t] < 0 or not lm[b, j]:
          continue
        if s and (not lm[b, t + s] or np.any(x[b, t + 1:t + s + 1] == EOS)):
          continue
        terms[s].append(np_ce(logits[b, t, s], x[b, j]))
  ces = [mean_or_zero(ts) for ts in terms]
  return ces[0] + LAM * np.mean(ces[1:]), ces, logits


def test_jtp_loss_matches_reference_and_drafts():
  c = make_config("jtp", 3)
  obj, params = build(c)
  batch = random_batch(3)
  loss, metrics = jit(obj.loss)(params, batch, jax.random.PRNGKey(0))
  expected, ces, logits = jtp_reference(c, obj, params, batch)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  np.testing.assert_allclose([float(metrics[f"ce_{k}"]) for k in range(4)], ces, rtol=1e-4)
  # Drafting from the trunk state at t with the true next tokens = the training slots at t.
  b, t = next((b, t) for b in range(B) for t in range(L - 4) if batch["loss_mask"][b, t + 1:t + 4].all())
  h, _ = trunk_h(obj, params, batch)
  got = jit(functools.partial(jtp.draft_logits, obj.modules))(
      params, h[b:b + 1, t], batch["tokens"][b:b + 1, t], batch["tokens"][b:b + 1, t + 1:t + 4])
  np.testing.assert_allclose(got[0], logits[b, t], rtol=1e-4, atol=1e-4)
  # Representation "combine": slot 0's TeacherCombine output.
  c2 = make_config("jtp", 3, representation="combine")
  rep = jit(objectives.build(c2).hidden)(params, batch)
  f = params["fetch"]
  a = np.asarray(params["trunk"]["embed"])[batch["tokens"]] + float(f["gamma"]) * np.asarray(
      trunk_h(obj, params, batch, full=True)[0])
  want = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(rep, want * np.asarray(f["combine_scale"]) + np.asarray(f["combine_bias"]),
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- BST
def bst_backward_reference(c, params, batch):
  """b (B, L, D): the backward stack run separately on each backward document (an EOS closes the
  document before it), reversed, so only x_u..x_{end of document} can reach b_u. Each document is one
  row of a single call: its tokens reversed, then padding that it cannot attend to."""
  cfg = ModelConfig.from_config(c.model)
  x, seg = batch["tokens"], batch["segment_ids"]
  E = np.asarray(params["trunk"]["embed"])
  docs = []
  for b in range(B):
    bdoc = np.concatenate([[0], np.cumsum(x[b] == EOS)[:-1]])
    docs += [(b, np.where((bdoc == d) & (seg[b] >= 0))[0][::-1]) for d in np.unique(bdoc[seg[b] >= 0])]
  e, dseg, dpos = np.zeros((len(docs), L, D), np.float32), np.full((len(docs), L), -1), np.zeros((len(docs), L))
  for r, (b, idx) in enumerate(docs):
    e[r, :len(idx)], dseg[r, :len(idx)], dpos[r, :len(idx)] = E[x[b, idx]], 0, np.arange(len(idx))
  y = np.asarray(jit(Stack(cfg).apply)({"params": params["backward"]}, e, dseg.astype(np.int32),
                                       dpos.astype(np.int32)))
  out = np.zeros((B, L, D))
  for r, (b, idx) in enumerate(docs):
    out[b, idx] = y[r, :len(idx)]
  return out


def bst_reference(c, obj, params, batch, b_enc):
  o = c.objective
  x, lm, seg = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
  f_enc = np.asarray(trunk_h(obj, params, batch, full=True)[0], np.float64)
  th = jax.tree.map(lambda a: np.asarray(a, np.float64), params["text_head"])
  W = np.asarray(params["trunk"]["head"], np.float64)
  rows, all_terms = [], []
  for b in range(B):
    terms = []
    for s in range(L):
      for u in range(s + 1, L):
        k = u - s
        if k < o.bst_min_gap or (o.bst_max_gap > 0 and k >= o.bst_max_gap):
          continue
        if seg[b, s] < 0 or seg[b, u] < 0 or np.any(x[b, s + 1:u] == EOS) or not lm[b, s + 1]:
          continue
        z = np.concatenate([f_enc[b, s], b_enc[b, u]])
        gu = np.einsum("d,dgh->gh", z, th["mlp_in"]["kernel"])
        z = z + (gu[0] / (1 + np.exp(-gu[0])) * gu[1]) @ th["mlp_out"]["kernel"]
        z = np_rms(z, th["norm"]["scale"])
        t_next, t_prev = (EOS, EOS) if k == 1 else (x[b, s + 1], x[b, u - 1])
        terms.append(0.5 * (np_ce(z[:D] @ W, t_next) + np_ce(z[D:] @ W, t_prev)))
    rows.append(mean_or_zero(terms))
    all_terms += terms
  loss = float(np.mean(rows)) if o.bst_normalize == "row" else mean_or_zero(all_terms)
  return loss, len(all_terms) / B


@functools.lru_cache(maxsize=None)
def _bst_loss(options):
  return jit(objectives.build(make_config("bst", **dict(options))).loss)


def bst_loss(**options):
  """The jitted BST loss for these objective options (compiled once per option set)."""
  return _bst_loss(tuple(sorted(options.items())))


@pytest.fixture(scope="module")
def bst_setup():
  c = make_config("bst", bst_pair_chunk=7)
  obj, params = build(c)
  batch = random_batch(4)
  return c, obj, params, batch, bst_backward_reference(c, params, batch)


def test_bst_backward_encoder_is_anticausal_per_document(bst_setup):
  c, obj, params, batch, b_ref = bst_setup
  _, b_enc = jit(functools.partial(bst.encode, obj.modules, eos_id=EOS))(params, batch)
  valid = batch["segment_ids"] >= 0
  np.testing.assert_allclose(np.asarray(b_enc)[valid], b_ref[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(bst_pair_chunk=7),
                                     dict(bst_min_gap=2, bst_max_gap=6, bst_normalize="pair", bst_pair_chunk=5)])
def test_bst_loss_matches_reference(bst_setup, options):
  _, _, params, batch, b_ref = bst_setup
  c = make_config("bst", **options)
  obj = objectives.build(c)
  loss, metrics = bst_loss(**options)(params, batch, jax.random.PRNGKey(0))
  expected, pairs_per_row = bst_reference(c, obj, params, batch, b_ref)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  assert float(metrics["pairs"]) == pytest.approx(pairs_per_row)


def test_bst_pair_subsampling(bst_setup):
  _, _, params, batch, _ = bst_setup
  s, u = bst.candidate_pairs(L, 1, -1)
  valid = np.asarray(bst.pair_valid(batch, jnp.asarray(s), jnp.asarray(u), EOS))
  n_valid = valid.sum(1)
  # A budget that holds every valid pair: the same loss as all pairs.
  frac = float(n_valid.max()) / len(s) + 1e-6
  full = bst_loss(bst_pair_chunk=7)(params, batch, jax.random.PRNGKey(0))
  sub = bst_loss(bst_pair_fraction=frac)(params, batch, jax.random.PRNGKey(5))
  np.testing.assert_allclose(float(sub[0]), float(full[0]), rtol=1e-5)
  # A small budget: min(budget, valid) pairs per row, different draws for different rngs.
  frac = 0.1
  budget = int(np.ceil(frac * len(s)))
  loss_fn = bst_loss(bst_pair_fraction=frac)
  (l1, m1), (l2, _) = loss_fn(params, batch, jax.random.PRNGKey(1)), loss_fn(params, batch, jax.random.PRNGKey(2))
  assert float(m1["pairs"]) == pytest.approx(np.minimum(budget, n_valid).mean())
  assert np.isfinite(float(l1)) and float(l1) != float(l2)


def test_bst_generation_logits(bst_setup):
  """next_token_logits on the forward state = the text head on (f_s, b of a lone EOS)."""
  c, obj, params, batch, b_ref = bst_setup
  f_enc, _ = trunk_h(obj, params, batch, full=True)
  got = jit(functools.partial(bst.next_token_logits, obj.modules, eos_id=EOS))(params, f_enc)
  # Row 2 has an EOS at 7 closing a document: its backward state is the lone-EOS state.
  assert batch["tokens"][2, 7] == EOS
  b_eos = jnp.broadcast_to(jnp.asarray(b_ref[2, 7], jnp.float32), f_enc.shape)
  z_next, _ = jit(obj.modules["text_head"].apply)({"params": params["text_head"]}, f_enc, b_eos)
  np.testing.assert_allclose(got, np.asarray(z_next) @ np.asarray(params["trunk"]["head"]), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ parameter counts
def counts(name, horizon=1, model=None, **objective):
  c = config_lib.base_config()
  c.model.update(model or dict(vocab_size=50304, d_model=2048, n_layer=22, n_head=16))
  c.dynamics.hidden = 6528
  c.data = ml_collections.ConfigDict(dict(eos_id=0, seq_len=1024))
  c.objective.update(dict(name=name, horizon=horizon), **objective)
  return info.param_counts(info.resolve(c)[0])


def test_table4_parameter_counts_1p3b():
  """Paper Table 4 (FineWeb-Edu 1.3B: 22 layers, D=2048, 16 heads, V=50304, H_psi=6528), within 0.5%,
  and the exact formulas of BASELINES.md section 7."""
  got = {}
  for label, name, d in [("gpt", "gpt", 1), ("nextlat", "nextlat", 1), ("mtp1", "mtp", 1), ("mtp2", "mtp", 2),
                         ("mtp8", "mtp", 8), ("jtp", "jtp", 1), ("bst", "bst", 1)]:
    got[label] = counts(name, d)
  paper = {"gpt": (1.32e9, 1.32e9), "nextlat": (1.40e9, 1.32e9), "mtp1": (1.37e9, 1.32e9),
           "mtp2": (1.42e9, 1.32e9), "mtp8": (1.72e9, 1.32e9), "jtp": (1.34e9, 1.34e9), "bst": (2.57e9, None)}
  for label, (train, inference) in paper.items():
    assert got[label]["training"]["total"] == pytest.approx(train, rel=5e-3), label
    if inference:
      assert got[label]["inference"]["total"] == pytest.approx(inference, rel=5e-3), label
  gpt = 1_319_200_768
  assert got["gpt"]["training"]["total"] == gpt
  assert got["nextlat"]["training"]["total"] == gpt + 82_726_912
  for d in (1, 2, 8):
    assert got[f"mtp{d}"]["training"]["total"] == gpt + d * 50_599_936
    assert got[f"mtp{d}"]["inference"]["total"] == gpt
  assert got["jtp"]["training"]["total"] == gpt + 16_783_361 + 4 * 2 ** 2
  assert got["bst"]["training"]["total"] == gpt + 1_113_155_584 + 133_693_440 + 4_096
  assert got["bst"]["inference_scoring"]["total"] == got["bst"]["training"]["total"]
  for final_norm, per_depth in ((False, 58_990_592), (True, 58_992_640)):
    ds = counts("mtp_deepseek", 2, deepseek_final_norm=final_norm)
    assert ds["training"]["total"] == gpt + 2 * per_depth and ds["inference"]["total"] == gpt


def test_small_model_counts_of_baselines_md():
  """BASELINES.md section 7: MTP extra per unit of horizon, JTP's Fetch, Path-Star GPT (METHOD.md)."""
  path_star = dict(vocab_size=106, d_model=384, n_layer=12, n_head=6)
  assert counts("gpt", model=path_star)["training"]["total"] == 21_324_672
  countdown = dict(vocab_size=10008, d_model=768, n_layer=12, n_head=12)
  a5 = dict(vocab_size=60, d_model=512, n_layer=2, n_head=8)
  for model, per_d in [(path_star, 1_770_624), (countdown, 7_080_192), (a5, 3_212_800)]:
    gpt = counts("gpt", model=model)["training"]["total"]
    assert counts("mtp", 3, model=model)["training"]["total"] - gpt == 3 * per_d
  for model, fetch in [(path_star, 590_977), (countdown, 2_361_601)]:
    assert counts("jtp", 4, model=model)["training"]["fetch"] == fetch + 4 * 5 ** 2


def test_info_json_and_flops():
  Dm, Vm, F, Lr = 16, 32, 16, 5  # row of 5 tokens: T = 4 trained positions
  layer, head = 3 * Dm * Dm + Dm * Dm + 2 * Dm * F + F * Dm, Dm * Vm  # matmul weights per token
  c = config_lib.base_config()
  c.model.update(vocab_size=Vm, d_model=Dm, n_layer=2, n_head=2, ffn_width=F)
  c.data = ml_collections.ConfigDict(dict(eos_id=0, seq_len=Lr - 1))
  c.objective.update(name="mtp", horizon=1)
  out = info.info(c)
  p = out["params"]
  assert p["training"]["total"] == p["training"]["trunk"] + p["training"]["heads"]
  assert p["training"]["total"] - p["inference"]["total"] == layer + 2 * Dm + Dm  # head 1: block + its norm
  # MTP d=1: trunk 1 block and 2 head blocks over T = 4 positions; CE over 4 + 3; 3 attention layers.
  f = flops.train_flops_per_step(c, Lr, 1)
  assert f["trunk"] == 6 * layer * 4 and f["aux"] == 6 * layer * 2 * 4 and f["head"] == 6 * head * 7
  assert f["attention"] == 12 * 16 * Dm * 3 and f["total"] == f["trunk"] + f["aux"] + f["head"] + f["attention"]
  assert out["flops_per_token"]["train"] == pytest.approx(f["total"] / 4)
  assert out["flops_per_token"]["inference"] == 2 * (2 * layer + head) + 4 * 4 * Dm * 2
  c.objective.update(name="jtp", horizon=2)  # S = 3 slots: head over 3 x 4, Fetch 4D^2 over 12, attn 4 S^2 D
  f = flops.train_flops_per_step(c, Lr, 1)
  assert f["head"] == 6 * head * 12 and f["aux"] == 3 * (2 * 4 * Dm * Dm * 12 + 4 * 9 * Dm * 4)
  c.objective.update(name="mtp_deepseek", horizon=2)  # modules over 3 and 2 positions
  f = flops.train_flops_per_step(c, Lr, 1)
  assert f["head"] == 6 * head * (4 + 3 + 2) and f["aux"] == 6 * (2 * Dm * Dm + layer) * 5
  assert f["attention"] == 12 * Dm * (2 * 16 + 9 + 4)
  c.objective.update(name="bst", bst_max_gap=3)  # pairs with gap 1, 2 in a row of 5: 4 + 3
  f = flops.train_flops_per_step(c, Lr, 1)
  h2 = 128  # 128 round(8/3 2D / 128)
  assert f["pairs"] == 7 and f["head"] == 6 * 2 * head * 7 and f["aux"] == 6 * (2 * Dm * 2 * h2 + h2 * 2 * Dm) * 7
  assert f["trunk"] == 2 * 6 * 2 * layer * 5 and f["attention"] == 2 * 12 * 25 * Dm * 2


# ------------------------------------------------------------------------------------ sharded training
@pytest.mark.parametrize("name", ["mtp", "mtp_deepseek", "jtp", "bst"])
def test_trains_on_sharded_mesh(name):
  from nextlat_jax.data.pipeline import dataset_info, make_dataset
  from nextlat_jax.parallel.mesh import make_mesh
  from nextlat_jax.train import step as step_lib
  c = load_config_file("quickstart", name)
  c.data.seq_len = 32
  ds_info = dataset_info(c.data)
  c.model.update(vocab_size=ds_info.vocab_size, d_model=32, n_layer=2, n_head=4, ffn_width=64)
  c.data.eos_id = ds_info.eos_id
  c.objective.horizon = 1
  c.batch_size, c.steps = 16, 30
  c.optimizer.update(lr=3e-3, schedule="constant", warmup_steps=0)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  config_lib.validate(c, 8)
  setup = step_lib.build(c, make_mesh(c.mesh))
  init = setup.init.lower(jax.random.PRNGKey(0)).compile(FAST_COMPILE)
  step = setup.step.lower(setup.abstract_state, setup.abstract_batch(16, 33),
                          setup.abstract_rng()).compile(FAST_COMPILE)
  ds = make_dataset(c.data, split="train", global_batch_size=16, seed=0, process_index=0, process_count=1)
  state, losses = init(jax.random.PRNGKey(0)), []
  for s in range(30):
    state, m = step(state, step_lib.global_batch(ds[s], setup.batch_sharding), jax.random.PRNGKey(1))
    losses.append(m["loss"])
  losses = np.asarray(jax.device_get(losses))
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.6 * losses[:5].mean(), losses


# ------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("name,key,value", [
    ("mtp", "objective.horizon", 0), ("mtp", "objective.lambda_mtp", -1.0),
    ("mtp", "objective.mtp_eos_mask", "chain"), ("mtp", "objective.representation", "combine"),
    ("mtp", "model.n_layer", 1), ("jtp", "objective.representation", "head0"), ("jtp", "objective.horizon", 0),
    ("jtp", "model.d_model", 10), ("mtp_deepseek", "objective.deepseek_concat", "sum"),
("bst", "objective.bst_min_gap", 0),
    ("bst", "objective.bst_max_gap", 1), ("bst", "objective.bst_pair_fraction", 0.0),
    ("bst", "objective.bst_pair_chunk", 0), ("bst", "objective.bst_normalize", "token")])
def test_bad_values_name_their_key(name, key, value):
  c = make_config(name)
  section, field = key.split(".")
  if key == "model.d_model":
    c.model.n_head = 5  # head_dim 2, but 10 is not divisible by jtp's min(4, 5) = 4 Fetch heads
  c[section][field] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 1)
  assert e.value.key == key
