"""Countdown solve rate and per-equation validity (METRICS.md section 7).

From the 13-token prompt, generate exactly 17 tokens; detokenise (integers as decimals, `|` and
operators as symbols; the text stops at the first EOS) and split on `,`. Part k (k = 1..3) must be
exactly `int op int = int`. The available set S starts as {inputs} U {target} (a set: the reference's
quirks, reuse allowed); equation k is valid iff a, b are in S and the exact value of a op b is c
(division exact), then c joins S. Scores, in percent over every requested test problem:
- solve_rate: equations 1..3 valid and the last c equals the target;
- valid_equation (paper Fig. 5; primary): equations 1..k all valid (cumulative, as the reference,
  which stops at the first invalid one), k = 1..3;
- raw_valid_equation: equation k valid on its own, S grown by every parsed c before it (our reading of
  "raw per-equation validity");
- eq3_and_target: equation 3 valid and its c equals the target;
- strict_solve_rate (project variant): inputs are a multiset, each used exactly once, the target is not
  available, intermediates are usable once;
- solve_rate_seen / solve_rate_heldout: over problems with training / held-out targets.
Decoding: greedy and sampling at temperature 1 (the reference default), both reported.
"""
from __future__ import annotations

import collections
import re
from typing import Any

import jax
import numpy as np

from nextlat_jax.data.tasks import countdown
from nextlat_jax.eval.metrics import make_completer, map_batches

TEMPERATURES = (0.0, 1.0)
_EQ = re.compile(r"^(\d+)([+\-*/])(\d+)=(\d+)$")


def mode_name(temperature: float) -> str:
  return "greedy" if temperature == 0 else f"sample_t{temperature:g}"


def detokenize(tokens: list[int]) -> str:
  """Token ids -> text, stopping at the first EOS."""
  symbols = {countdown.BAR: "|", countdown.EQUALS: "=", countdown.COMMA: ",", **countdown.OP_NAMES}
  out = []
  for t in tokens:
    t = int(t)
    if t == countdown.EOS:
      break
    out.append(str(t) if 0 <= t < 10000 else symbols.get(t, "?"))
  return "".join(out)


def _value(a: int, op: str, b: int) -> int | None:
  """Exact integer value of a op b, None when not an integer (inexact division, division by 0)."""
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  return a // b if b != 0 and a % b == 0 else None


def parse(text: str) -> list[tuple[int, str, int, int] | None]:
  """The three equations of a generated answer; None where a part is not `int op int = int`."""
  parts = text.split(",")
  out = []
  for k in range(countdown.NUM_EQUATIONS):
    m = _EQ.match(parts[k]) if k < len(parts) else None
    out.append((int(m[1]), m[2], int(m[3]), int(m[4])) if m else None)
  return out


def score(inputs: list[int], target: int, generated: list[int]) -> dict[str, Any]:
  """Per-problem flags of one generated answer (see the module docstring)."""
  eqs = parse(detokenize(generated))
  available, cumulative, raw = set(inputs) | {target}, [], []
  ok_so_far = True
  for eq in eqs:
    valid = eq is not None and eq[0] in available and eq[2] in available and _value(eq[0], eq[1], eq[2]) == eq[3]
    raw.append(valid)
    ok_so_far = ok_so_far and valid
    cumulative.append(ok_so_far)
    if eq is not None:
      available.add(eq[3])
  pool, strict = collections.Counter(inputs), True
  for eq in eqs:
    if eq is None or _value(eq[0], eq[1], eq[2]) != eq[3]:
      strict = False
      break
    for operand in (eq[0], eq[2]):
      if pool[operand] < 1:
        strict = False
      pool[operand] -= 1
    pool[eq[3]] += 1
  last = eqs[-1]
  hits = last is not None and last[3] == target
  return {"correct": cumulative[-1] and hits, "valid": cumulative, "raw_valid": raw,
          "eq3_and_target": raw[-1] and hits, "strict": strict and hits}


def aggregate(flags: list[dict[str, Any]], heldout: np.ndarray) -> dict[str, float | list]:
  """Percentages over problems (see the module docstring)."""
  pct = lambda x: 100.0 * float(np.mean(x)) if len(x) else float("nan")
  correct = np.asarray([f["correct"] for f in flags], bool)
  heldout = np.asarray(heldout, bool)
  return {
      "solve_rate": pct(correct),
      "solve_rate_seen": pct(correct[~heldout]),
      "solve_rate_heldout": pct(correct[heldout]),
      "valid_equation": [pct([f["valid"][k] for f in flags]) for k in range(countdown.NUM_EQUATIONS)],
      "raw_valid_equation": [pct([f["raw_valid"][k] for f in flags]) for k in range(countdown.NUM_EQUATIONS)],
      "eq3_and_target": pct([f["eq3_and_target"] for f in flags]),
      "strict_solve_rate": pct([f["strict"] for f in flags]),
  }


def evaluate(config: Any, objective: Any, params: Any, *, num_examples: int | None = None,
             batch_size: int = 256, temperatures: tuple[float, ...] = TEMPERATURES, seed: int = 0,
             progress: Any = lambda it: it) -> dict[str, float | list]:
  """Solve rate and equation validity (%) on the test problems, per decoding mode."""
  src = countdown.make_source(config.data, split="eval", seed=int(config.seed))
  n = len(src) if num_examples is None else int(num_examples)
  if not 1 <= n <= len(src):
    raise ValueError(f"num_examples={num_examples!r}: must be in [1, data.n_test={len(src)}]")
  rows = np.stack([src.problem(i)[0] for i in range(n)])
  inputs, targets = rows[:, :countdown.NUM_INPUTS], rows[:, countdown.NUM_INPUTS]
  heldout = np.asarray([src.is_heldout(int(t)) for t in targets])
  complete = make_completer(config, objective, countdown.ANSWER_LEN)
  key = jax.random.PRNGKey(seed)
  out: dict[str, float | list] = {"num_examples": n, "num_heldout_target": int(heldout.sum())}
  for temperature in temperatures:
    fn = lambda b, x, t=temperature: complete(params, x, jax.random.fold_in(key, b), t)
    generated = map_batches(config, objective, fn, [rows[:, :countdown.PROMPT_LEN]], batch_size, progress)[0]
    flags = [score(inputs[i].tolist(), int(targets[i]), generated[i].tolist()) for i in range(n)]
    for name, value in aggregate(flags, heldout).items():
      out[f"{mode_name(temperature)}/{name}"] = value
  return out


def task(run: Any) -> dict[str, float | list]:
  """`nextlat eval` entry (nextlat_jax.eval.TASK_METRICS): a restored nextlat_jax.eval.run.TaskRun."""
  return evaluate(run.config, run.objective, run.params, num_examples=run.num_samples,
                  batch_size=run.batch_size, seed=run.seed, progress=lambda it: run.progress(it, "countdown"))
