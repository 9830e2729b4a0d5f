"""An lm-evaluation-harness backend over the trunk of a restored run, and `nextlat lm-eval`.

`NextLatLM` is an `lm_eval` (0.4.13, the optional extra `lmeval`) TemplateLM: the harness tokenises
(context, continuation) pairs with the run's tokenizer the way its Hugging Face wrapper (HFLM) does and
calls `_loglikelihood_tokens`; `loglikelihood_rolling` cuts a document into the harness's disjoint
rolling windows (`get_rolling_token_windows` + `make_disjoint_window`, context_len 1, EOS as the
prefix token) and sums their log-likelihoods; `generate_until` decodes with the KV-cache loop of
`nextlat_jax.decoding.generate` (greedy unless the task asks for sampling), then cuts the text at the
first stop sequence. The model is params["trunk"] alone (the paper's inference model).

Layout: every input row follows the batch contract (nextlat_jax.data.packing): its first token has
position 1, an EOS starts a document (position 0), so EOS-prefixed windows read as fresh documents.
Static shapes: rows are scored `batch_size` at a time (short batches padded), the row width is the next
power of two >= the longest row (at least `min_bucket`, at most `max_length`: by default the run's trained
context, data.seq_len or the prepared manifest's; --max_length overrides it), and inputs longer than `max_length` are cut on the left as HFLM cuts them. One compile per width.
Word-level tokenizers whose `decode` returns a word list (the street-grid data) decode to
" " + " ".join(words), the text a continuation has after its context.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nextlat_jax.data import packing
from nextlat_jax.decoding import generate as gen
from nextlat_jax.models.transformer import DTYPES, ModelConfig, Transformer, unembed

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models import utils as model_utils
except ImportError:  # the optional extra; the command explains how to install it
  lm_utils = model_utils = None
  TemplateLM = object

INSTALL_HINT = ("lm-eval is not installed: pip install -e '.[lmeval]' in the nextlat_jax checkout "
                "(or pip install lm-eval==0.4.13)")
FLAGS = flags.FLAGS
flags.DEFINE_string("tasks", None, "lm-eval: comma-separated harness task names, e.g. lambada_openai,piqa.")
flags.DEFINE_integer("num_fewshot", None, "lm-eval: few-shot examples (default: the task's, else 0).")
flags.DEFINE_float("limit", None, "lm-eval: examples per task (< 1: a fraction); for quick checks only.")
flags.DEFINE_string("include_path", None, "lm-eval: a folder of extra task YAMLs (beside the built-in tasks).")
flags.DEFINE_integer("lm_eval_batch_size", 16, "lm-eval: rows per forward (static; short batches are padded).")
flags.DEFINE_integer("max_gen_toks", 256, "lm-eval: default new tokens for generate_until tasks.")
flags.DEFINE_string("lm_eval_mesh", None, "lm-eval: 'D,F,T' data,fsdp,tensor mesh of this machine's devices "
                    "(default: all on data).")
flags.DEFINE_string("lm_eval_tokenizer", None, "lm-eval: tokenizer name (gpt2 | bpe) when the run's data has none "
                    "(e.g. pretokenized shards).")
flags.DEFINE_string("lm_eval_tokenizer_path", "", "lm-eval: files of --lm_eval_tokenizer.")
flags.DEFINE_integer("max_length", None, "lm-eval: the longest input in tokens (default: the run's trained "
                     "context, data.seq_len or the prepared manifest's); longer inputs are cut on the left.")
flags.DEFINE_bool("log_samples", False, "lm-eval: also write every request and response into the results JSON.")


def _score(trunk: Any, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, positions_BxT: jax.Array,
           targets_BxT: jax.Array, *, module: Transformer) -> tuple[jax.Array, jax.Array]:
  """(log p(target) float32, target == argmax) at every position."""
  h_BxTxD, _ = module.apply({"params": trunk}, tokens_BxT, segment_ids_BxT, positions_BxT)
  logits_BxTxV = unembed(h_BxTxD, trunk["head"], DTYPES[module.cfg.dtype])
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  logp_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)  # no (B, T, V) log-softmax buffer
  return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


class NextLatLM(TemplateLM):
  """lm-eval backend: trunk params (any mesh), its ModelConfig and a tokenizer (encode / decode)."""

  def __init__(self, trunk: Any, cfg: ModelConfig, tokenizer: Any, *, eos_id: int, max_length: int,
               pad_id: int = 0, batch_size: int = 16, max_gen_toks: int = 256, mesh: jax.sharding.Mesh | None = None,
               rules: tuple = (), min_bucket: int = 16, seed: int = 0, info: dict | None = None):
    if lm_utils is None:
      raise ImportError(INSTALL_HINT)
    super().__init__()
    if max_length < 2 or batch_size < 1:
      raise ValueError(f"max_length={max_length}, batch_size={batch_size}: need max_length >= 2, batch_size >= 1")
    self.trunk, self.cfg, self.tokenizer = trunk, cfg, tokenizer
    self.eos_id, self.pad_id, self._max_length = int(eos_id), int(pad_id), int(max_length)
    self.max_gen_toks_default, self.min_bucket, self.seed = int(max_gen_toks), int(min_bucket), int(seed)
    self.info = dict(info or {})
    self._batch_sharding = None
    if mesh is not None:
      from nextlat_jax.parallel import sharding
      self._batch_sharding = sharding.batch_sharding(mesh, rules)
      axes = self._batch_sharding.spec[0] if self._batch_sharding.spec else None
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      batch_size = -(-batch_size // shards) * shards  # rows split evenly over the batch axes
    self.batch_size = int(batch_size)
    module = Transformer(cfg, mesh=mesh, rules=rules if mesh is not None else ())
    self._score = jax.jit(functools.partial(_score, module=module))

  @classmethod
  def from_run(cls, workdir: str, step: int | None = None, *, mesh: dict | None = None, tokenizer: Any = None,
               max_length: int | None = None, **kwargs: Any) -> NextLatLM:
    """The trunk of `workdir`'s checkpoint (nextlat_jax.run.load_run onto `mesh`, e.g. {"fsdp": 2});
    the tokenizer defaults to the run's, max_length to its trained context (row length - 1 = data.seq_len)."""
    from nextlat_jax.interop import hf_config
    from nextlat_jax.run import load_run
    run = load_run(workdir, step, mesh)
    trunk = hf_config.llama_trunk(run)
    tok = tokenizer or run.tokenizer
    if tok is None:
      raise ValueError(f"data.name={run.config.data.name!r}: no text tokenizer for this run; "
                       "give --lm_eval_tokenizer (and --lm_eval_tokenizer_path)")
    info = {"nextlat_workdir": os.path.abspath(workdir), "nextlat_step": run.step,
            "nextlat_objective": run.config.objective.name}
    return cls(trunk, run.cfg, tok, eos_id=run.eos_id, pad_id=run.pad_id,
               max_length=int(max_length or run.row_len - 1), mesh=run.mesh, rules=run.rules, info=info, **kwargs)

  @property
  def eot_token_id(self) -> int:
    return self.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self.max_gen_toks_default

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__))

  def get_model_info(self) -> dict:
    return dict(self.info)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs: Any) -> list[int]:
    del add_special_tokens, kwargs
    ids = [int(t) for t in self.tokenizer.encode(string)]
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids: Any, **kwargs: Any) -> str:
    del kwargs
    ids = [int(ids)] if np.ndim(ids) == 0 else [int(t) for t in ids]
    text = self.tokenizer.decode(ids)
    if isinstance(text, (list, tuple)):  # a word-level tokenizer
      return " " + " ".join(text) if text else ""
    return text

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, self._batch_sharding) if self._batch_sharding is not None else jnp.asarray(x)

  def _width(self, n: int) -> int:
    return min(gen.bucket_length(n, self.min_bucket), self.max_length)

  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
    """Per (request, context ids, continuation ids): (sum log p(continuation | context), all greedy)."""
    del disable_tqdm, kwargs
    rows = []
    for _, ctx, cont in requests:
      if not cont:
        raise ValueError("lm-eval: an empty continuation has no log-likelihood")
      if len(cont) > self.max_length:
        raise ValueError(f"lm-eval: continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
      full = (list(ctx or [self.eos_id]) + list(cont))[-(self.max_length + 1):]
      rows.append((full[:-1], full[1:], len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Any] = [None] * len(rows)
    B = self.batch_size
    for start in range(0, len(order), B):
      idx = order[start:start + B]
      T = self._width(len(rows[idx[0]][0]))
      tokens_BxT = np.full((B, T), self.pad_id, np.int32)
      targets_BxT = np.zeros((B, T), np.int32)
      for j, i in enumerate(idx):
        inp, tgt, _ = rows[i]
        tokens_BxT[j, :len(inp)], targets_BxT[j, :len(tgt)] = inp, tgt
      segment_ids_BxT, positions_BxT = packing.segment_ids_and_positions(tokens_BxT, self.eos_id)
      logp_BxT, greedy_BxT = jax.device_get(self._score(
          self.trunk, *(self._put(a) for a in (tokens_BxT, segment_ids_BxT, positions_BxT, targets_BxT))))
      for j, i in enumerate(idx):
        n, c = len(rows[i][0]), rows[i][2]
        out[i] = (float(np.sum(logp_BxT[j, n - c:n], dtype=np.float64)), bool(np.all(greedy_BxT[j, n - c:n])))
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return out

  def rolling_windows(self, string: str) -> list[tuple[None, list[int], list[int]]]:
    """The harness's disjoint rolling windows of a document, as HFLM builds them."""
    windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
    return [(None, *lm_utils.make_disjoint_window(w)) for w in windows]

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    windows, counts = [], []
    for (string,) in [r.args for r in requests]:
      w = self.rolling_windows(string)
      windows += w
      counts.append(len(w))
    lls = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
    out, k = [], 0
    for r, n in zip(requests, counts):
      total = float(sum(ll for ll, _ in lls[k:k + n]))
      k += n
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
    return out

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    out: list[Any] = [None] * len(requests)
    eos_text = self.tok_decode([self.eos_id])
    for g, idx in enumerate(groups.values()):
      kwargs = model_utils.normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_new = int(kwargs.pop("max_gen_toks"))
      do_sample = bool(kwargs.get("do_sample"))
      temperature = (float(kwargs.get("temperature") or 0.0) or 1.0) if do_sample else 0.0
      sampling = gen.Sampling(temperature, int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
      max_ctx = self.max_length - max_new
      if max_ctx < 1:
        raise ValueError(f"lm-eval: max_gen_toks={max_new} leaves no context within max_length={self.max_length}")
      prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.eos_id])[-max_ctx:] for i in idx}
      order = sorted(idx, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        batch = order[start:start + self.batch_size]
        pad_rows = self.batch_size - len(batch)
        prompt_BxP, len_B = gen.pad_prompts([prompts[i] for i in batch] + [[self.eos_id]] * pad_rows,
                                            self.pad_id, self.min_bucket)
        limit_B = np.array([max_new] * len(batch) + [1] * pad_rows, np.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), g * 1_000_003 + start)
        res = gen.generate_jit({"trunk": self.trunk}, prompt_BxP, len_B, key, cfg=self.cfg, sampling=sampling,
                               max_new=max_new, eos_id=self.eos_id, pad_id=self.pad_id, stop_at_eos=True,
                               limit_B=limit_B)
        tokens_BxM, lengths_B = jax.device_get((res.tokens_BxM, res.lengths_B))
        for j, i in enumerate(batch):
          ids = [int(t) for t in tokens_BxM[j, :lengths_B[j]]]
          ids = ids[:-1] if ids and ids[-1] == self.eos_id else ids
          text = model_utils.postprocess_generated_text(self.tok_decode(ids), until, None)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def _mesh_flag(value: str | None) -> dict | None:
  if not value:
    return None
  try:
    d, f, t = (int(x) for x in value.split(","))
  except ValueError:
    raise ValueError(f"--lm_eval_mesh={value!r}: expected three integers 'D,F,T'") from None
  return {"data": d, "fsdp": f, "tensor": t}


def _dataset_unavailable(e: Exception, tasks: list[str], manager: Any) -> str:
  """One line for a task whose dataset cannot be loaded here: which task, and how to make it available."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  found = re.search(r"'([^']+)'", first)
  path = found.group(1) if found else ""

  def mentions(name: str) -> bool:
    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    return bool(path and yaml_path and os.path.isfile(yaml_path) and path in open(yaml_path, encoding="utf-8").read())

  names = [t for t in tasks if mentions(t)] or tasks
  return (f"task {','.join(names)}: its dataset is not available on this machine ({type(e).__name__}: {first}); "
          "download it once where the Hub is reachable into the Hugging Face datasets cache (HF_HOME / "
          "HF_DATASETS_CACHE, then run with HF_DATASETS_OFFLINE=1), or evaluate a local task: "
          "--include_path=DIR of task YAMLs with local data (e.g. configs/lm_eval, task nextlat_local_text)")


def task_manager(tasks: list[str], include_path: str | None = None) -> Any:
  """The harness's TaskManager for `tasks`: the tasks under include_path, else also the built-in ones (whose
  index takes ~20 s to build, so it is skipped when include_path holds every task). An unknown task name
  raises a one-line ValueError (before any model is loaded)."""
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
  if manager is None or not set(tasks) <= set(manager.all_tasks):
    manager = TaskManager(include_path=include_path)
  known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
  unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]  # a YAML path is a task too
  if unknown:
    raise ValueError(f"--tasks: unknown task {','.join(unknown)} (`lm_eval ls tasks` lists the built-in ones; "
                     "--include_path=DIR adds a folder of task YAMLs, e.g. configs/lm_eval)")
  return manager


def evaluate(lm: NextLatLM, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, log_samples: bool = False, manager: Any = None) -> dict:
  """lm_eval.simple_evaluate on `lm` (`manager`: task_manager(tasks, include_path) unless given). A task
  whose dataset cannot be loaded here (offline, not in the HF datasets cache, a missing local file) raises
  a one-line ValueError naming the task and how to make it available."""
  import lm_eval
  manager = manager or task_manager(tasks, include_path)
  limit = int(limit) if limit is not None and limit >= 1 else limit
  try:
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                   num_fewshot=num_fewshot, limit=limit, log_samples=log_samples)
  except (ConnectionError, FileNotFoundError) as e:  # datasets: no network / not cached / no local file
    raise ValueError(_dataset_unavailable(e, tasks, manager)) from None


def lm_eval_command(argv: list[str]) -> None:
  """`nextlat lm-eval --workdir=DIR --tasks=...`: writes DIR/lm_eval/results_step{N}.json."""
  del argv
  if FLAGS.workdir is None or not FLAGS.tasks:
    raise app.UsageError("lm-eval needs --workdir and --tasks")
  try:
    if lm_utils is None:
      raise ValueError(INSTALL_HINT)
    if jax.process_count() > 1:
      raise ValueError("lm-eval runs in one process (on any mesh of its local devices), not with --distributed")
    tok = None
    if FLAGS.lm_eval_tokenizer:
      from nextlat_jax.data import tokenizers
      tok = tokenizers.load(FLAGS.lm_eval_tokenizer, FLAGS.lm_eval_tokenizer_path)
    tasks = [t.strip() for t in FLAGS.tasks.split(",") if t.strip()]
    manager = task_manager(tasks, FLAGS.include_path)
    lm = NextLatLM.from_run(FLAGS.workdir, FLAGS.step, mesh=_mesh_flag(FLAGS.lm_eval_mesh), tokenizer=tok,
                            max_length=FLAGS.max_length, batch_size=FLAGS.lm_eval_batch_size, max_gen_toks=FLAGS.max_gen_toks)
    results = evaluate(lm, tasks, include_path=FLAGS.include_path, num_fewshot=FLAGS.num_fewshot,
                       limit=FLAGS.limit, log_samples=FLAGS.log_samples, manager=manager)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"nextlat lm-eval: {e}", file=sys.stderr)
    sys.exit(2)
  path = os.path.join(FLAGS.workdir, "lm_eval", f"results_step{lm.info['nextlat_step']}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False))
  print(lm_utils.make_table(results))
  print(json.dumps({"results": path, **{k: {m: v for m, v in r.items() if isinstance(v, (int, float))}
                                        for k, r in results["results"].items()}}))
