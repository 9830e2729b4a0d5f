"""Manhattan task data (TASKS.md §1): graph, tokenizer, random walks, OD split, packed rows."""

import collections
import pathlib

import grain
import numpy as np
import pytest

from nextlat_jax.data.tasks import manhattan

REAL_GRAPH = pathlib.Path(__file__).resolve().parents[1].parent / 'shared/data/manhattan/edges.tsv'
needs_real_graph = pytest.mark.skipif(not REAL_GRAPH.is_file(), reason=f'{REAL_GRAPH} absent')


@pytest.fixture(scope='module')
def grid():
  return manhattan.StreetGraph.grid(6, 7, seed=3)


@pytest.fixture(scope='module')
def real_graph():
  if not REAL_GRAPH.is_file():
    pytest.skip(f'{REAL_GRAPH} absent')
  return manhattan.StreetGraph.from_tsv(REAL_GRAPH)


def split_walks(source, tokens):
  """Words of each walk in a row, with whether it is complete (ends with `end`)."""
  words = source.tokenizer.decode(tokens)
  walks, current = [], []
  for w in words:
    current.append(w)
    if w == manhattan.EOS_WORD:
      walks.append((current, True))
      current = []
  if current:
    walks.append((current, False))
  return walks


def check_walk(graph, words, complete, min_moves, max_moves):
  """Every move is an edge; the destination word is the final node; length within bounds."""
  origin, destination, *moves = words
  if complete:
    assert moves[-1] == manhattan.EOS_WORD
    moves = moves[:-1]
    assert min_moves <= len(moves) <= max_moves
  node = graph.index[origin]
  for move in moves:
    node = graph.next_node_NxK[node, manhattan.DIRECTION_INDEX[move]]
    assert node >= 0, f'illegal move {move} in {words}'
  if complete:
    assert graph.node_ids[node] == destination
  return graph.index[origin], graph.index[destination]


# ---------------------------------------------------------------- graph


def test_from_tsv_and_transition_table(tmp_path):
  path = tmp_path / 'g.tsv'
  path.write_text('# comment\n10\tN\t11\n10\tE\t12\n11\tS\t10\n\n12\tNW\t12\n')
  g = manhattan.StreetGraph.from_tsv(path)
  assert g.node_ids == ('10', '11', '12')
  assert g.n_nodes == 3 and g.n_edges == 4
  expected = np.full((3, 8), -1)
  expected[0, manhattan.DIRECTION_INDEX['N']] = 1
  expected[0, manhattan.DIRECTION_INDEX['E']] = 2
  expected[1, manhattan.DIRECTION_INDEX['S']] = 0
  expected[2, manhattan.DIRECTION_INDEX['NW']] = 2
  np.testing.assert_array_equal(g.next_node_NxK, expected)
  np.testing.assert_array_equal(g.out_degree, [2, 1, 1])
  assert g.moves[0] == ((0, 1), (2, 2))


@pytest.mark.parametrize('text, match', [
    ('10\tN\t11\n10\tX\t12\n', r'g\.tsv:2: unknown direction'),
    ('10\tN\t11\n10 N 12\n', r'g\.tsv:2: expected source<TAB>direction<TAB>target'),
    ('10\tN\t11\n\n10\tN\t12\n', r'g\.tsv:3: duplicate edge .*node 10, direction N.*g\.tsv:1'),
    ('10\tN\tend\n', r'g\.tsv:1: invalid node id'),
])
def test_malformed_tsv_names_file_and_line(tmp_path, text, match):
  path = tmp_path / 'g.tsv'
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    manhattan.StreetGraph.from_tsv(path)


def test_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.tsv'):
    manhattan.StreetGraph.from_tsv(tmp_path / 'nope.tsv')


def reachable(next_node_NxK, start):
  seen, todo = {start}, [start]
  while todo:
    for nxt in next_node_NxK[todo.pop()]:
      if nxt >= 0 and nxt not in seen:
        seen.add(int(nxt))
        todo.append(int(nxt))
  return seen


def test_grid_strongly_connected_deterministic_and_round_trips(grid, tmp_path):
  assert grid.n_nodes == 42
  assert (grid.out_degree >= 2).all()
  assert len(reachable(grid.next_node_NxK, 0)) == grid.n_nodes
  reverse = [[] for _ in range(grid.n_nodes)]
  for s, t in zip(*np.nonzero(grid.next_node_NxK >= 0)):
    reverse[grid.next_node_NxK[s, t]].append(s)
  reverse_NxK = np.full((grid.n_nodes, max(map(len, reverse))), -1)
  for t, sources in enumerate(reverse):
    reverse_NxK[t, :len(sources)] = sources
  assert len(reachable(reverse_NxK, 0)) == grid.n_nodes
  again = manhattan.StreetGraph.grid(6, 7, seed=3)
  np.testing.assert_array_equal(grid.next_node_NxK, again.next_node_NxK)
  grid.to_tsv(tmp_path / 'grid.tsv')
  loaded = manhattan.StreetGraph.from_tsv(tmp_path / 'grid.tsv')
  assert loaded.node_ids == grid.node_ids
  np.testing.assert_array_equal(loaded.next_node_NxK, grid.next_node_NxK)


@needs_real_graph
def test_real_graph_facts(real_graph):
  g = real_graph
  assert g.n_edges == 9705 and g.n_nodes == 4579
  assert collections.Counter(g.out_degree.tolist()) == {0: 17, 1: 717, 2: 2698, 3: 996, 4: 151}
  src_E, dir_E = np.nonzero(g.next_node_NxK >= 0)
  tgt_E = g.next_node_NxK[src_E, dir_E]
  assert (src_E == tgt_E).sum() == 6
  assert g.n_nodes - len(set(tgt_E.tolist())) == 45  # nodes with no incoming edge
  tok = manhattan.WordTokenizer(g.node_ids)
  assert tok.vocab_size == 4589
  all_words = ['end', *manhattan.DIRECTIONS, *g.node_ids]
  assert tok.words[1:] == tuple(sorted(all_words, reverse=True))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_round_trip():
  tok = manhattan.WordTokenizer(['42429002', '42434898', '9', '100'])
  expected = ['<pad>', 'end', 'W', 'SW', 'SE', 'S', 'NW', 'NE', 'N', 'E',
              '9', '42434898', '42429002', '100']
  assert list(tok.words) == expected
  assert tok.pad_id == 0 and tok.eos_id == 1 and tok.vocab_size == 14
  np.testing.assert_array_equal(tok.direction_ids, [8, 7, 9, 4, 5, 3, 2, 6])  # N NE E SE S SW W NW
  text = '42429002 42434898 S N N NE end'
  ids = tok.encode(text)
  np.testing.assert_array_equal(ids, [12, 11, 5, 8, 8, 7, 1])
  assert ids.dtype == np.int32
  assert ' '.join(tok.decode(ids)) == text
  with pytest.raises(ValueError, match='unknown word'):
    tok.encode('42429002 UP')


# ---------------------------------------------------------------- walks and rows


def test_rows_are_legal_walks(grid):
  src = manhattan.WalkRowSource(grid, row_len=97, num_rows=100, seed=0, min_moves=3, max_moves=20)
  n_complete = 0
  for i in range(40):
    row = src[i]
    assert row['tokens'].shape == (97,)
    walks = split_walks(src, row['tokens'])
    assert walks[0][0][0] in grid.index  # each row starts at a walk's origin
    for words, complete in walks:
      if len(words) >= 2:
        check_walk(grid, words, complete, 3, 20)
      n_complete += complete
  assert n_complete > 40


@needs_real_graph
def test_real_graph_rows_are_legal_walks(real_graph):
  src = manhattan.WalkRowSource(real_graph, row_len=257, num_rows=10, seed=1)
  for i in range(10):
    for words, complete in split_walks(src, src[i]['tokens']):
      if len(words) >= 2:
        check_walk(real_graph, words, complete, 3, 97)
      if complete:
        assert len(words) <= 100


def sink_graph():
  # 0 -> 1 -> 2 -> 0 cycle (E); node 1 also goes N to sink 3.
  return manhattan.StreetGraph.from_edges(
      [('0', 'E', '1'), ('1', 'E', '2'), ('2', 'E', '0'), ('1', 'N', '3')])


def test_walks_stop_at_sinks_and_resample_short_ones():
  g = sink_graph()
  rng = np.random.default_rng(0)
  lengths, ends_at_sink = [], 0
  for _ in range(300):
    nodes, dirs = manhattan.random_walk(g, rng, min_moves=3, max_moves=8)
    assert len(nodes) == len(dirs) + 1 and 3 <= len(dirs) <= 8
    assert all(g.next_node_NxK[a, k] == b for a, k, b in zip(nodes, dirs, nodes[1:]))
    assert g.index['3'] not in nodes[:-1]  # a sink can only be the last node
    ends_at_sink += nodes[-1] == g.index['3']
    lengths.append(len(dirs))
  assert ends_at_sink > 0 and set(lengths) == set(range(3, 9))
  short = [len(manhattan.random_walk(g, rng, 3, 8, resample_short=False)[1]) for _ in range(300)]
  assert min(short) == 0  # walks starting at the sink are kept


def test_od_split_disjoint_and_exclusive(grid):
  kw = dict(row_len=65, num_rows=200, seed=5, heldout_fraction=0.2, split_seed=7, max_moves=12)
  train = manhattan.WalkRowSource(grid, split='train', **kw)
  eval_ = manhattan.WalkRowSource(grid, split='eval', **kw)
  pairs = {}
  for name, src in (('train', train), ('eval', eval_)):
    pairs[name] = set()
    for i in range(30):
      for words, complete in split_walks(src, src[i]['tokens']):
        if len(words) >= 2:  # a cut-off walk still shows its (origin, destination)
          pairs[name].add(check_walk(grid, words, complete, 3, 12))
  assert pairs['train'] and pairs['eval'] and not pairs['train'] & pairs['eval']
  o, d = np.array(sorted(pairs['eval'])).T
  assert manhattan.heldout_mask(o, d, 7, 0.2).all()
  o, d = np.array(sorted(pairs['train'])).T
  assert not manhattan.heldout_mask(o, d, 7, 0.2).any()


def test_heldout_mask_fraction_and_scalar_agrees():
  o_P, d_P = np.divmod(np.arange(200 * 200), 200)
  held_P = manhattan.heldout_mask(o_P, d_P, split_seed=0, fraction=0.1)
  assert 0.09 < held_P.mean() < 0.11
  for k in range(0, 40000, 997):
    assert bool(manhattan.heldout_mask(int(o_P[k]), int(d_P[k]), 0, 0.1)) == held_P[k]
  assert (manhattan.heldout_mask(o_P, d_P, split_seed=1, fraction=0.1) != held_P).any()


def test_context_length_one_masks_origin_and_destination(grid):
  src = manhattan.WalkRowSource(grid, row_len=129, num_rows=4, seed=0, max_moves=10)
  for i in range(4):
    row = src[i]
    pos, mask = row['positions'], row['loss_mask']
    expected = ((pos == 0) | (pos > 2)).astype(np.int32)
    expected[0] = 0
    np.testing.assert_array_equal(mask, expected)
    assert pos[0] == 1 and pos[1] == 2  # the first walk starts at position 1
    assert (mask[row['tokens'] == src.tokenizer.eos_id] == 1).all()
    assert all(v.dtype == np.int32 for v in row.values())


def test_rows_deterministic_and_index_addressed(grid):
  kw = dict(row_len=65, num_rows=50, max_moves=12)
  a = manhattan.WalkRowSource(grid, seed=11, **kw)
  b = manhattan.WalkRowSource(grid, seed=11, **kw)
  c = manhattan.WalkRowSource(grid, seed=12, **kw)
  ev = manhattan.WalkRowSource(grid, seed=11, split='eval', **kw)
  for i in (0, 7, 49):
    np.testing.assert_array_equal(a[i]['tokens'], b[i]['tokens'])
    assert not np.array_equal(a[i]['tokens'], c[i]['tokens'])
    assert not np.array_equal(a[i]['tokens'], ev[i]['tokens'])
  assert not np.array_equal(a[0]['tokens'], a[1]['tokens'])
  np.testing.assert_array_equal(a[np.int64(7)]['tokens'], a[7]['tokens'])


def test_source_protocol(grid):
  src = manhattan.WalkRowSource(grid, row_len=33, num_rows=5, seed=0)
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  assert len(src) == 5
  with pytest.raises(IndexError):
    src[5]
  ds = grain.MapDataset.source(src)
  np.testing.assert_array_equal(ds[3]['tokens'], src[3]['tokens'])


def test_bad_arguments(grid):
  with pytest.raises(ValueError, match='split'):
    manhattan.WalkRowSource(grid, row_len=9, num_rows=1, seed=0, split='test')
  with pytest.raises(ValueError, match='heldout_fraction'):
    manhattan.WalkRowSource(grid, row_len=9, num_rows=1, seed=0, split='eval', heldout_fraction=0)
  with pytest.raises(ValueError, match='min_moves'):
    manhattan.WalkRowSource(grid, row_len=9, num_rows=1, seed=0, min_moves=5, max_moves=4)
