"""Path-Star, Countdown and A5: generators, serialisations, masks, splits, determinism, metrics
(hand-computed values and oracle / wrong models end to end), configs (Table 5 and tiny presets)."""
import itertools
import math
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlat_jax import objectives
from nextlat_jax.config import load_config_file
from nextlat_jax.data import pipeline
from nextlat_jax.data.tasks import a5, countdown, path_star
from nextlat_jax.eval import TASK_METRICS
from nextlat_jax.eval.metrics import a5 as a5_metric
from nextlat_jax.eval.metrics import countdown as cd_metric
from nextlat_jax.eval.metrics import path_star as ps_metric
from nextlat_jax.models.transformer import unembed
from nextlat_jax.parallel.mesh import make_mesh
from nextlat_jax.train import preflight, step as step_lib


# XLA's CPU backend at optimisation level 0 compiles these tiny programs about twice as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


load_config = load_config_file


def small(cfg, **kw):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(kw)
  return cfg


# ---------------------------------------------------------------- Path-Star

def reference_star(i, d, l, n):
  """The reference generator as published (global random, list pops)."""
  random.seed(i)
  nodes = list(range(n))
  random.shuffle(nodes)
  source = nodes.pop()
  edges, path = [], [source]
  for p in range(d):
    old = source
    for _ in range(l - 1):
      new = nodes.pop()
      edges.append((old, new))
      old = new
      if p == 0:
        path.append(old)
  random.shuffle(edges)
  return edges, path


@pytest.mark.parametrize("d,l", [(2, 10), (5, 5), (7, 7)])
def test_path_star_graph_answer_is_unique_path(d, l):
  for i in range(30):
    edges, path = path_star.generate(i, d, l, 100)
    assert (edges, path) == reference_star(i, d, l, 100)
    nodes = [u for e in edges for u in e]
    assert len(edges) == d * (l - 1) and len(set(nodes)) == 1 + d * (l - 1)
    assert all(0 <= u < 100 for u in nodes)
    children = {}
    for u, v in edges:
      children.setdefault(u, []).append(v)
    source, goal = path[0], path[-1]
    assert len(children[source]) == d and goal not in children  # d arms; the goal is a leaf
    parent = {v: u for u, v in edges}
    walk = [goal]
    while walk[-1] != source:  # in a tree the path is unique: follow parents back from the goal
      walk.append(parent[walk[-1]])
    assert walk[::-1] == path and len(path) == l


def test_path_star_serialisation_and_vocabulary():
  edges, path = [(7, 3), (7, 12), (3, 9), (12, 4)], [7, 3, 9]  # G_{2,3}
  assert path_star.text(edges, path) == "7,3|7,12|3,9|12,4/7,9=7,3,9"
  assert path_star.tokens(edges, path) == [7, 3, 100, 7, 12, 100, 3, 9, 100, 12, 4, 102, 7, 9, 101, 7, 3, 9, 104]
  for (d, l), (row, prompt, ctx) in {(2, 10): (68, 57, 56), (5, 5): (69, 63, 62), (7, 7): (137, 129, 128)}.items():
    cfg = path_star.default_data_config(d, l)
    assert pipeline.dataset_info(cfg) == pipeline.DatasetInfo(vocab_size=106, eos_id=104, pad_id=103, row_len=row)
    assert (path_star.prompt_len(d, l), path_star.context_length(d, l)) == (prompt, ctx)
    row0 = pipeline.make_source(cfg, split="train", seed=1234)[0]
    assert row0["tokens"].shape == (row,) and row0["tokens"][prompt - 1] == 101 and row0["tokens"][-1] == 104
    assert np.array_equal(row0["loss_mask"], (np.arange(row) >= prompt).astype(np.int32))  # l path tokens + EOS
    assert row0["segment_ids"][-1] == 1 and row0["positions"][-1] == 0 and row0["positions"][0] == 1


def test_path_star_splits_and_determinism():
  cfg = small(path_star.default_data_config(2, 5), n_train=300, n_test=50)
  a = pipeline.make_source(cfg, split="train", seed=1)
  b = pipeline.make_source(cfg, split="train", seed=1)
  c = pipeline.make_source(cfg, split="train", seed=2)
  for i in (0, 7, 299, 300, 1234):
    assert all(np.array_equal(a[i][k], b[i][k]) for k in a[i])
  # every epoch visits each training graph once; the training seed changes the order, not the set
  assert sorted(a.graph_index(i) for i in range(300)) == list(range(300))
  assert sorted(a.graph_index(i) for i in range(300, 600)) == list(range(300))
  assert {c.graph_index(i) for i in range(300)} == set(range(300))
  assert [a.graph_index(i) for i in range(20)] != [c.graph_index(i) for i in range(20)]
  test = pipeline.make_source(cfg, split="eval", seed=1)
  assert len(test) == 50 and [test.graph_index(i) for i in range(3)] == [300, 301, 302]
  train_graphs = {tuple(sorted(path_star.generate(g, 2, 5, 100)[0])) for g in range(300)}
  assert not any(tuple(sorted(test.example(i)[0])) in train_graphs for i in range(50))


# ---------------------------------------------------------------- Countdown

def test_countdown_spec_example_and_vocabulary():
  eqs = [(83, "-", 14, 69), (91, "-", 88, 3), (69, "/", 3, 23)]
  assert countdown.reference_search(23, [14, 83, 88, 91]) == ["83-14=69", "91-88=3", "69/3=23"]
  leaf = countdown.first_solution_leaf(np.array([[14, 83, 88, 91]]), np.array([23]))[0]
  assert countdown.solution_from_leaf([14, 83, 88, 91], int(leaf)) == eqs
  assert countdown.raw_text([14, 83, 88, 91], 23, eqs) == "14,83,88,91,23|83-14=69,91-88=3,69/3=23"
  assert countdown.row_tokens([14, 83, 88, 91], 23, eqs) == (
      [14, 83, 88, 91, 23] + [10000] * 8 + [83, 10004, 14, 10005, 69, 10006, 91, 10004, 88, 10005, 3, 10006,
                                            69, 10002, 3, 10005, 23, 10007])
  info = pipeline.dataset_info(countdown.default_data_config())
  assert (info.vocab_size, info.eos_id, info.row_len) == (10008, 10007, 31)
  assert countdown.OPS == {"*": 10001, "/": 10002, "+": 10003, "-": 10004}


def test_countdown_vectorised_search_is_the_dfs():
  rng = np.random.default_rng(0)
  nums = np.sort(rng.integers(1, 100, size=(400, 4)), axis=1)
  targets = rng.integers(10, 101, size=400)
  leaves = countdown.first_solution_leaf(nums, targets)
  for k in range(400):
    ref = countdown.reference_search(int(targets[k]), nums[k].tolist())
    got = None if leaves[k] < 0 else [f"{a}{o}{b}={c}" for a, o, b, c in
                                      countdown.solution_from_leaf(nums[k].tolist(), int(leaves[k]))]
    assert got == ref
  assert 0.05 < np.mean(leaves >= 0) < 0.5  # most draws are redrawn


def test_countdown_solutions_are_valid_and_splits_hold_out_targets():
  cfg = small(countdown.default_data_config(), n_train=600, n_test=40)
  seen, heldout = countdown.target_split(444, 10, 100, 0.1)
  assert len(heldout) == 9 and sorted(seen + heldout) == list(range(10, 101))
  train = pipeline.make_source(cfg, split="train", seed=0)
  test = pipeline.make_source(cfg, split="eval", seed=0)
  for src, n in ((train, 600), (test, 40)):
    for i in range(n):
      row, target = src.problem(i)
      inputs, answer = row[:4].tolist(), row[13:30].tolist()
      assert row[4] == target and list(row[5:13]) == [10000] * 8 and row[30] == 10007
      assert inputs == sorted(inputs) and all(1 <= v <= 99 for v in inputs)
      pool = sorted(inputs)
      for k in range(3):  # a op b = c, arithmetic exact, operands consumed from the multiset
        a, op, b, eq, c = answer[6 * k:6 * k + 5]
        sym = countdown.OP_NAMES[op]
        assert eq == 10005 and (k == 2 or answer[6 * k + 5] == 10006)
        exact = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                 "/": lambda: a // b if b and a % b == 0 else -1}[sym]()
        assert c == exact and c < 10000
        pool.remove(a)
        pool.remove(b)
        pool.append(c)
      assert pool == [target]
      if src is train:
        assert target in seen
      else:
        assert (target in heldout) == (i % 2 == 1)
  fields = train[5]
  assert np.array_equal(fields["loss_mask"], (np.arange(31) >= 13).astype(np.int32))
  again = pipeline.make_source(cfg, split="train", seed=0)
  assert all(np.array_equal(again[i]["tokens"], train[i]["tokens"]) for i in (0, 599, 601))


# ---------------------------------------------------------------- A5

def test_a5_group_and_running_product():
  assert len(a5.ELEMENTS) == 60 and a5.ELEMENTS[0] == (0, 1, 2, 3, 4)
  assert list(a5.ELEMENTS) == sorted(a5.ELEMENTS)
  assert all(sum(p[i] > p[j] for i, j in itertools.combinations(range(5), 2)) % 2 == 0 for p in a5.ELEMENTS)
  assert sorted(set(a5.MUL.ravel().tolist())) == list(range(60))
  assert np.array_equal(a5.MUL[0], np.arange(60)) and not np.array_equal(a5.MUL, a5.MUL.T)
  words = np.random.default_rng(3).integers(0, 60, size=(50, 36))
  labels = a5.running_product(words)
  for w, lab in zip(words, labels):
    acc = (0, 1, 2, 3, 4)
    for t, g in enumerate(w):
      p = a5.ELEMENTS[g]
      acc = tuple(acc[p[i]] for i in range(5))  # (acc . g)[i] = acc[g[i]]: g first, then acc
      assert a5.ELEMENTS.index(acc) == lab[t]


def test_a5_rows_splits_and_determinism():
  cfg = small(a5.default_data_config(), n_words=1000, n_test=20)
  info = pipeline.dataset_info(cfg)
  assert (info.vocab_size, info.eos_id, info.row_len) == (61, 60, 13)
  train = pipeline.make_source(cfg, split="train", seed=0)
  row = train[3]
  w = row["tokens"][:12]
  assert row["tokens"][12] == 60 and np.all(w < 60)
  assert np.array_equal(row["labels"], np.concatenate([[60], a5.running_product(w[None])[0]]))
  assert np.array_equal(row["segment_ids"], [0] * 12 + [-1])
  assert np.array_equal(row["positions"], list(range(1, 13)) + [0])
  assert np.array_equal(row["loss_mask"], [0] + [1] * 12)
  assert np.array_equal(pipeline.make_source(cfg, split="train", seed=0)[3]["tokens"], row["tokens"])
  test = pipeline.make_source(cfg, split="eval", seed=0)
  assert len(test) == 200 and sorted(train.word_index(i) for i in range(800)) == list(range(800))
  assert [test.word_index(i) for i in range(2)] == [800, 801]
  words = {tuple(train[i]["tokens"][:12]) for i in range(800)} | {tuple(test[i]["tokens"][:12]) for i in range(200)}
  assert len(words) == 1000  # unique
  tw, tl = a5.test_words(cfg, 20)
  assert tw.shape == tl.shape == (20, 36) and np.array_equal(tl, a5.running_product(tw))
  with pytest.raises(ValueError, match="data.seq_len"):
    pipeline.dataset_info(small(cfg, seq_len=11))


# ---------------------------------------------------------------- metrics: hand-computed values

def test_metric_scores_by_hand():
  got = ps_metric.path_scores([[1, 2, 3], [1, 5, 3], [1, 2, 3], [0, 2, 3]], [[1, 2, 3]] * 4)
  assert got == {"exact_path_accuracy": 50.0, "token_accuracy_by_position": [75.0, 75.0, 100.0]}
  got = a5_metric.accuracy_by_length([[1, 2, 3], [1, 0, 3]], [[1, 2, 3], [1, 2, 3]])
  assert got == {"acc_by_length": [100.0, 50.0, 100.0], "prefix_acc_by_length": [100.0, 50.0, 50.0]}

  def toks(text):
    out = []
    for part in text.replace(",", " , ").replace("=", " = ").replace("+", " + ").replace("-", " - ").replace(
        "*", " * ").replace("/", " / ").split():
      out.append({",": 10006, "=": 10005, **countdown.OPS}.get(part, None) or int(part))
    return out + [10007]

  inputs, target = [14, 83, 88, 91], 23
  cases = {  # answer -> (correct, cumulative valid, raw valid, strict)
      "83-14=69,91-88=3,69/3=23": (True, [True] * 3, [True] * 3, True),
      "83-14=69,91-88=3,69/3=24": (False, [True, True, False], [True, True, False], False),
      "83-14=69,91-88=2,88-69=19": (False, [True, False, False], [True, False, True], False),
      "91-88=3,3*23=69,69-3=66": (False, [True, True, True], [True, True, True], False),  # the target is in S
      "14+14=28,91-88=3,28-5=23": (False, [True, True, False], [True, True, False], False),
      "83/14=5,91-88=3,5*3=15": (False, [False] * 3, [False, True, True], False),  # 83/14 is not exact
      "88-14=74,74+83=157,91": (False, [True, True, False], [True, True, False], False),
  }
  flags = []
  for text, (correct, valid, raw, strict) in cases.items():
    f = cd_metric.score(inputs, target, toks(text))
    assert (f["correct"], f["valid"], f["raw_valid"], f["strict"]) == (correct, valid, raw, strict), text
    flags.append(f)
  assert cd_metric.detokenize(toks("83-14=69,1+1=2")) == "83-14=69,1+1=2"
  assert cd_metric.score([4, 4, 2, 3], 23, toks("4*4=16,16+4=20,20+3=23"))["strict"] is False  # 4 used thrice
  assert cd_metric.score([4, 4, 2, 3], 24, toks("4*4=16,16+4=20,20+4=24"))["correct"] is True  # set: reuse
  agg = cd_metric.aggregate(flags, np.array([0, 1, 0, 0, 0, 0, 0], bool))
  assert agg["solve_rate"] == pytest.approx(100 / 7) and agg["solve_rate_seen"] == pytest.approx(100 / 6)
  assert agg["solve_rate_heldout"] == 0.0 and agg["strict_solve_rate"] == pytest.approx(100 / 7)
  assert agg["valid_equation"] == pytest.approx([600 / 7, 500 / 7, 200 / 7])


# ---------------------------------------------------------------- metrics: oracle and wrong models

def token_codes(vocab):
  """(V, D) codes with a unique best match: one-hot(v // 128) + one-hot(v % 128); D = V // 128 + 129."""
  v = np.arange(vocab)
  return np.concatenate([np.eye(vocab // 128 + 1)[v // 128], np.eye(128)[v % 128]], axis=1).astype(np.float32)


class TableOracle:
  """A fake trunk: h_t = 50 code(next token of the table row with the same prompt, + shift); the head is
  codes.T, so the logits are 100 for that token and <= 50 for every other."""
  mesh = None

  def __init__(self, rows, prompt_len, vocab, shift=0):
    self.rows, self.P, self.V, self.shift = jnp.asarray(rows), prompt_len, vocab, shift
    self.codes = jnp.asarray(token_codes(vocab))

  def apply(self, variables, tokens_BxT, segment_ids, positions):
    match = jnp.all(tokens_BxT[:, None, :self.P] == self.rows[None, :, :self.P], axis=-1)
    row = self.rows[jnp.argmax(match, axis=1)]
    nxt = row[:, 1:tokens_BxT.shape[1] + 1]
    return 50.0 * self.codes[(nxt + self.shift) % self.V], None


class A5Oracle:
  """Fake trunk and dynamics computing the running product (shifted by `shift` for a wrong model)."""
  mesh = None

  def __init__(self, shift=0):
    self.shift = shift

  def _out(self, acc):
    return 50.0 * jax.nn.one_hot((acc + self.shift) % 60, 61)

  def apply(self, variables, x, *rest):
    if len(rest) == 1:  # dynamics: (h, e = one-hot embedding of the next input)
      h, e = x, rest[0]
      cur = (jnp.argmax(h, -1) - self.shift) % 60
      return self._out(jnp.asarray(a5.MUL)[cur, jnp.argmax(e, -1)])
    acc = jax.lax.associative_scan(lambda a, b: jnp.asarray(a5.MUL)[a, b], x, axis=1)
    return self._out(acc), None


def fake(name, modules, vocab):
  codes = jnp.eye(vocab) if name == "nextlat" else jnp.asarray(token_codes(vocab))  # A5 oracle: one-hot
  return objectives.Objective(name, None, None, None, modules), {"trunk": {"head": codes.T, "embed": codes}}


def test_metrics_score_oracle_100_and_wrong_model_0():
  cfg = load_config("path_star", "tiny")
  cfg.data.update(n_test=24)
  cfg, _ = preflight.resolve(cfg)
  src = pipeline.make_source(cfg.data, split="eval", seed=0)
  rows = np.stack([src[i]["tokens"] for i in range(24)])
  for shift, want in ((0, 100.0), (1, 0.0)):
    obj, params = fake("gpt", {"trunk": TableOracle(rows, src.prompt_len, 106, shift)}, 106)
    out = ps_metric.evaluate(cfg, obj, params, num_examples=24, batch_size=16)
    for mode in ("greedy", "sample_t1"):
      assert out[f"{mode}/exact_path_accuracy"] == want
      assert out[f"{mode}/token_accuracy_by_position"] == [want] * 5

  cfg = load_config("countdown", "tiny")
  cfg.data.update(n_test=12)
  cfg, _ = preflight.resolve(cfg)
  src = pipeline.make_source(cfg.data, split="eval", seed=0)
  rows = np.stack([src.problem(i)[0] for i in range(12)])
  for shift, want in ((0, 100.0), (1, 0.0)):
    obj, params = fake("gpt", {"trunk": TableOracle(rows, 13, 10008, shift)}, 10008)
    out = cd_metric.evaluate(cfg, obj, params, num_examples=12, batch_size=8, temperatures=(0.0,))
    assert out["greedy/solve_rate"] == out["greedy/strict_solve_rate"] == want
    assert out["greedy/valid_equation"] == [want] * 3 and out["greedy/solve_rate_heldout"] == want
    assert out["num_heldout_target"] == 6

  cfg = load_config("a5", "tiny")
  cfg, _ = preflight.resolve(cfg)
  for shift, want in ((0, 100.0), (7, 0.0)):
    oracle = A5Oracle(shift)
    obj, params = fake("nextlat", {"trunk": oracle, "dynamics": oracle}, 61)
    params["dynamics"] = {}
    out = a5_metric.evaluate(cfg, obj, params, num_examples=10, batch_size=8)
    for mode in ("transformer", "rnn"):
      assert out[f"{mode}/acc_by_length"] == [want] * 36 and out[f"{mode}/prefix_acc_at_test_len"] == want


def test_next_token_logits_of_the_baselines_match_their_own_heads():
  """MTP head 0 and JTP slot 0 as their drafting functions compute them at the last position."""
  from nextlat_jax import config as config_lib
  from nextlat_jax.eval.metrics import next_token_logits
  from nextlat_jax.objectives import jtp, mtp
  x = jnp.asarray(np.random.default_rng(0).integers(1, 11, size=(2, 6)), jnp.int32)
  seg, pos = jnp.zeros_like(x), jnp.broadcast_to(jnp.arange(1, 7), x.shape)
  for name in ("mtp", "jtp"):
    c = config_lib.base_config()
    c.model.update(vocab_size=11, d_model=16, n_layer=2, n_head=4, ffn_width=32)
    c.data = {"eos_id": 0}
    c.objective.update(name=name, horizon=2)
    obj = objectives.build(c)

    def both(params, obj=obj, c=c, name=name):
      got = next_token_logits(c, obj, params, x, seg, pos)[:, -1]
      z, _ = obj.modules["trunk"].apply({"params": params["trunk"]}, x, seg, pos)
      if name == "mtp":
        return got, mtp.draft_logits(obj.modules, params, z, seg, pos)[:, 0]
      return got, jtp.draft_logits(obj.modules, params, z[:, -1], x[:, -1], jnp.zeros((2, 0), jnp.int32))[:, 0]

    params = nn.unbox(jax.jit(obj.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1)))
    got, want = jax.jit(both, compiler_options=FAST_COMPILE)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- configs

def test_configs_table5_and_parameter_counts():
  ps = load_config("path_star", "gpt,g2_10")
  assert (ps.model.n_layer, ps.model.n_head, ps.model.d_model, ps.steps, ps.batch_size) == (12, 6, 384, 20_000, 512)
  assert (ps.optimizer.lr, ps.optimizer.weight_decay, ps.optimizer.grad_clip) == (5e-4, 0.1, 100.0)
  assert ps.objective.horizon == 8 and load_config("path_star", "g7_7").objective.horizon == 5
  cd = load_config("countdown", "d8")
  assert (cd.model.n_layer, cd.model.n_head, cd.model.d_model, cd.steps, cd.batch_size) == (12, 12, 768, 100_000, 1024)
  o = cd.objective
  assert (o.lambda_next_h, o.lambda_kl, o.horizon, cd.dynamics.hidden, cd.optimizer.lr) == (2.0, 1.0, 8, 768, 3e-4)
  a = load_config("a5")
  assert (a.objective.lambda_next_h, a.objective.lambda_kl, a.dynamics.hidden, a.optimizer.lr) == (1.0, 0.0, 1024, 1e-4)
  assert load_config("a5", "gpt,len36").data.seq_len == 36
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  for cfg, want in ((ps, {"trunk": 21_324_672}),
                    (load_config("path_star"), {"trunk": 21_324_672, "dynamics": 590_592}),
                    (a, {"trunk": 6_425_088 + 2 * 61 * 512, "dynamics": 2_622_464})):
    cfg, _ = preflight.resolve(cfg.copy_and_resolve_references())
    shapes = jax.eval_shape(objectives.build(cfg).init, jax.random.PRNGKey(0))
    assert {k: count(v) for k, v in shapes.items()} == want
  for name, bad in (("path_star", "g5"), ("countdown", "d0"), ("a5", "bst,len")):
    with pytest.raises(ValueError, match=repr(bad.split(",")[-1])):
      load_config(name, bad)


@pytest.mark.parametrize("name,arg", [("path_star", "nextlat,tiny"), ("countdown", "gpt,tiny"),
                                      ("a5", "nextlat,tiny")])
def test_tiny_presets_train(name, arg):
  cfg, info = preflight.resolve(load_config(name, arg))
  setup = step_lib.build(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  state = setup.init.lower(setup.abstract_rng()).compile(FAST_COMPILE)(jax.random.PRNGKey(0))
  ds = pipeline.make_dataset(cfg.data, split="train", global_batch_size=cfg.batch_size, seed=cfg.seed,
                             process_index=0, process_count=1)
  batches = [step_lib.global_batch(ds[s], setup.batch_sharding) for s in range(2)]
  assert all(v.shape == (cfg.batch_size, info.row_len) for v in batches[0].values())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batches[0])
  train_step = setup.step.lower(setup.abstract_state, abstract, setup.abstract_rng()).compile(FAST_COMPILE)
  ces = []
  for batch in batches:
    state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
    ces.append(float(metrics["ce"]))
  assert int(state.step) == 2 and ces[0] == pytest.approx(math.log(info.vocab_size), rel=0.1)  # ~uniform at init
  module_name, fn = TASK_METRICS[name].split(":")
  assert module_name == f"nextlat_jax.eval.metrics.{name}" and fn == "task"


def test_metrics_on_a_sharded_model_and_the_rnn_mode():
  """A real (random) NextLat on a 2-device mesh: the metrics run (batches rounded up to the mesh), and
  the A5 RNN mode agrees with the trunk at position 1 and with p_psi by hand at position 2."""
  cfg, _ = preflight.resolve(load_config("path_star", "tiny"))
  setup = step_lib.build(cfg, make_mesh(cfg.mesh, jax.devices()[:2]))
  params = setup.init.lower(setup.abstract_rng()).compile(FAST_COMPILE)(jax.random.PRNGKey(0)).params
  out = ps_metric.evaluate(cfg, setup.objective, params, num_examples=5, batch_size=4, temperatures=(0.0,))
  assert out["num_examples"] == 5 and 0.0 <= out["greedy/exact_path_accuracy"] <= 100.0

  cfg, _ = preflight.resolve(load_config("a5", "tiny"))
  obj = objectives.build(cfg)
  params = nn.unbox(jax.jit(obj.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0)))
  params["trunk"]["head"] = params["trunk"]["head"] * 30.0  # decisive logits at random init
  words, _ = a5.test_words(cfg.data, 6)
  rnn = np.asarray(a5_metric.rnn_predictions(cfg, obj)(params, jnp.asarray(words)))
  full = np.asarray(a5_metric.transformer_predictions(cfg, obj)(params, jnp.asarray(words)))
  assert rnn.shape == full.shape == (6, 36) and np.array_equal(rnn[:, 0], full[:, 0])
  ones = jnp.ones((6, 1), jnp.int32)
  h1, _ = obj.modules["trunk"].apply({"params": params["trunk"]}, jnp.asarray(words[:, :1]), ones * 0, ones)
  e2 = params["trunk"]["embed"][words[:, 1:2]]
  h2 = obj.modules["dynamics"].apply({"params": params["dynamics"]}, h1, e2)
  assert np.array_equal(rnn[:, 1], np.argmax(unembed(h2, params["trunk"]["head"])[:, 0], -1))


def test_a5_objective_trains_on_labels():
  cfg, _ = preflight.resolve(load_config("a5", "gpt,tiny"))
  obj = objectives.build(cfg)
  params = nn.unbox(jax.jit(obj.init, compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0)))
  src = pipeline.make_source(cfg.data, split="train", seed=0)
  batch = {k: jnp.stack([src[i][k] for i in range(4)]) for k in src[0]}
  loss, _ = jax.jit(obj.loss, compiler_options=FAST_COMPILE)(params, batch, jax.random.PRNGKey(0))
  h, _ = obj.modules["trunk"].apply({"params": params["trunk"]}, batch["tokens"][:, :-1],
                                   batch["segment_ids"][:, :-1], batch["positions"][:, :-1])
  logp = jax.nn.log_softmax(unembed(h, params["trunk"]["head"]), -1)
  nll = -jnp.take_along_axis(logp, batch["labels"][:, 1:, None], -1)[..., 0]
  assert float(loss) == pytest.approx(float(jnp.mean(nll)), rel=1e-5)  # all 12 label columns trained
