"""Perplexities (METRICS.md §11-12): token perplexity, lm-eval's rolling word perplexity (WikiText)
and LAMBADA perplexity / last-word accuracy, as functions over a `Scorer`.

Scorer: tokens_BxT (int32, right-padded rows; each row read as a packed row of the batch contract)
-> (logp_BxT1, greedy_BxT1), where column t holds log p(tokens[:, t+1] | tokens[:, :t+1]) and whether
tokens[:, t+1] is the argmax. The trained model's scorer is nextlat_jax.eval.run.TrainedLM.scorer.
Windows follow lm-eval's Hugging Face wrapper (`get_rolling_token_windows` with context_len 1, then
`make_disjoint_window`; a request's input is (context + continuation)[-(max_len + 1):][:-1]).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from nextlat_jax.data.sources.eval_corpora import wikitext_words

Scorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


def token_perplexity(scorer: Scorer, batches: Iterable[dict]) -> dict:
  """exp(sum NLL / number of predicted tokens) over rows of the batch contract, with their loss masks."""
  nll = count = 0.0
  for batch in batches:
    logp_BxT1, _ = scorer(np.asarray(batch["tokens"], np.int32))
    m = np.asarray(batch["loss_mask"])[:, 1:].astype(np.float64)
    nll -= float(np.sum(logp_BxT1 * m))
    count += float(m.sum())
  if count == 0:
    raise ValueError("token perplexity: no predicted tokens (all loss masks are 0)")
  return {"token_ppl": math.exp(nll / count), "token_nll": nll / count, "tokens": int(count)}


def rolling_windows(tokens: Sequence[int], max_len: int, prefix_token: int) -> list[Request]:
  """lm-eval's disjoint rolling windows: (context, continuation) requests covering every token once."""
  if max_len < 1:
    raise ValueError(f"max_len={max_len}: must be >= 1")
  tokens = list(tokens)
  if not tokens:
    return []
  first = min(max_len, len(tokens))
  windows = [([prefix_token] + tokens[:first - 1], tokens[:first])]
  predicted = first
  while predicted < len(tokens):
    n = min(len(tokens) - predicted, max_len)
    end = predicted + n
    windows.append((tokens[end - max_len - 1:end - 1], tokens[end - n:end]))
    predicted += n
  return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]  # make_disjoint_window


def loglikelihoods(scorer: Scorer, requests: Sequence[Request], max_len: int, batch_size: int = 8,
                   pad_id: int = 0, progress: Callable = lambda it, desc=None: it) -> list[tuple[float, bool]]:
  """(sum log p(continuation | context), whether every continuation token is the argmax) per request;
  the input is truncated on the left to max_len tokens, as lm-eval does. Rows are batched by length."""
  seqs = []
  for context, cont in requests:
    if not cont:
      raise ValueError("loglikelihood request with an empty continuation")
    seqs.append((list(context) + list(cont))[-(max_len + 1):])
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
  for a in progress(range(0, len(order), batch_size), "loglikelihood"):
    idx = order[a:a + batch_size]
    width = 64 * -(-len(seqs[idx[0]]) // 64)  # buckets bound the recompiles
    rows = np.full((batch_size, width), pad_id, np.int32)
    for b, i in enumerate(idx):
      rows[b, :len(seqs[i])] = seqs[i]
    logp_BxT1, greedy_BxT1 = scorer(rows)
    for b, i in enumerate(idx):
      n, c = len(seqs[i]), len(requests[i][1])
      cols = slice(n - 1 - c, n - 1)
      out[i] = (float(np.sum(logp_BxT1[b, cols], dtype=np.float64)), bool(np.all(greedy_BxT1[b, cols])))
  return out


def rolling_loglikelihood(scorer: Scorer, tokens: Sequence[int], max_len: int, prefix_token: int,
                          batch_size: int = 8) -> float:
  """Total log-likelihood of a document by disjoint rolling windows (lm-eval loglikelihood_rolling)."""
  requests = rolling_windows(tokens, max_len, prefix_token)
  return sum(ll for ll, _ in loglikelihoods(scorer, requests, max_len, batch_size))


def word_perplexity(scorer: Scorer, pages: Iterable[str], encode: Callable[[str], list[int]], max_len: int,
                    prefix_token: int, detokenize: Callable[[str], str] = lambda s: s, batch_size: int = 8,
                    progress: Callable = lambda it, desc=None: it) -> dict:
  """lm-eval `wikitext`: word perplexity, byte perplexity and bits per byte of whole pages, each scored
  as `detokenize(page)` by rolling windows; words and bytes count the original page."""
  pages = list(pages)
  requests, owner, words, n_bytes = [], [], 0, 0
  for p, page in enumerate(pages):
    for req in rolling_windows(encode(detokenize(page)), max_len, prefix_token):
      requests.append(req)
      owner.append(p)
    words += wikitext_words(page)
    n_bytes += len(page.encode("utf-8"))
  if not pages or words == 0:
    raise ValueError("word perplexity: no pages")
  ll = sum(v for v, _ in loglikelihoods(scorer, requests, max_len, batch_size, progress=progress))
  return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / n_bytes),
          "bits_per_byte": -ll / (n_bytes * math.log(2)), "documents": len(pages), "words": words,
          "bytes": n_bytes, "windows": len(requests)}


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str, prefix_token: int
                ) -> Request:
  """lm-eval's `_encode_pair`: trailing spaces move to the continuation; the continuation tokens are
  those of encode(context + continuation) after encode(context); an empty context is [prefix_token]."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
  whole = encode(context + continuation)
  ctx = encode(context)
  return (ctx if context else [prefix_token]), whole[len(ctx):]


def lambada(scorer: Scorer, pairs: Iterable[tuple[str, str]], encode: Callable[[str], list[int]], max_len: int,
            prefix_token: int, batch_size: int = 8, progress: Callable = lambda it, desc=None: it) -> dict:
  """lm-eval `lambada_standard`: ppl = exp(-mean per-passage log-likelihood of the last word) and the %
  of passages whose last-word tokens are all greedy (argmax) under teacher forcing."""
  requests = [encode_pair(encode, c, t, prefix_token) for c, t in pairs]
  if not requests:
    raise ValueError("lambada: no passages")
  res = loglikelihoods(scorer, requests, max_len, batch_size, progress=progress)
  lls = np.array([ll for ll, _ in res])
  return {"lambada_ppl": math.exp(-lls.mean()), "lambada_acc": 100.0 * float(np.mean([g for _, g in res])),
          "passages": len(requests)}


def evaluate(run) -> dict:
  """TASK_METRICS entry: token perplexity on the run's held-out rows (data.eval_rows / num_samples
  rows), and WikiText / LAMBADA when --wikitext_path / --lambada_path are given."""
  from nextlat_jax.data import tokenizers
  from nextlat_jax.data.sources import eval_corpora
  cfg, opts = run.config, run.options
  scorer = run.scorer()
  m = run.row_multiple  # every scorer batch is a multiple of the mesh's batch axes
  rows = -(-min(run.batch_size, 64) // m) * m
  small = -(-min(run.batch_size, 32) // m) * m
  n_batches = max(1, (run.num_samples or int(cfg.eval_steps) * int(cfg.batch_size)) // rows)
  out = token_perplexity(scorer, run.progress(run.batches("eval", n_batches, rows), "token perplexity"))
  max_len, eos = int(cfg.data.seq_len), int(cfg.data.eos_id)
  if opts.get("wikitext_path") or opts.get("lambada_path"):
    tok = tokenizers.load(cfg.data.get("tokenizer", "gpt2"), cfg.data.get("tokenizer_path", ""))
    if opts.get("wikitext_path"):
      pages = list(eval_corpora.wikitext_pages(os.path.expanduser(opts["wikitext_path"])))[:run.num_samples]
      out.update(word_perplexity(scorer, pages, tok.encode, max_len, eos, eval_corpora.wikitext_detokenizer,
                                 batch_size=small, progress=run.progress))
    if opts.get("lambada_path"):
      pairs = list(eval_corpora.lambada(os.path.expanduser(opts["lambada_path"])))[:run.num_samples]
      out.update(lambada(scorer, pairs, tok.encode, max_len, eos, batch_size=small, progress=run.progress))
  return out
