"""PNG plots of evaluation results (matplotlib, Agg backend): training curves, the singular-value
spectrum behind the effective rank, accuracy by length, probe CE by offset."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nextlat_jax.train.metrics_writer import read_history  # noqa: E402

CURVE_KEYS = ("loss", "ce", "eval_loss", "eval_ce", "next_h", "kl", "lr", "grad_norm")


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def tidy_y(ax, values: Sequence[float], percent: bool = False) -> None:
  """Y limits that make sense for the plotted values: from 0 when none is negative, a visible range for a
  constant (e.g. all-zero) series instead of matplotlib's +-5% around it (negative ticks), at most 100
  for percentages."""
  lo, hi = min(values), max(values)
  if hi == lo:  # a constant: pad by 10% of it (1 around 0; 100 for a zero percentage)
    pad = abs(hi) * 0.1 or (100.0 if percent else 1.0)
    lo, hi = lo - pad, hi + pad
  else:
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
  if min(values) >= 0:
    lo = 0.0
  if percent and max(values) <= 100:
    hi = min(hi, 100.0) if hi > 0 else 100.0
  ax.set_ylim(lo, hi)


def training_curves(metrics_jsonl: str, path: str, keys: Sequence[str] = CURVE_KEYS) -> str:
  """One panel per logged key (train and eval losses share the loss panels), against the step; the
  latest row of each step counts (metrics_writer.read_history: a resumed run draws one curve)."""
  history = read_history(metrics_jsonl)
  series = {k: history.get(k, []) for k in keys}
  panels = [k for k in keys if series[k] and not k.startswith("eval_")]
  if not panels:
    panels = [k for k in keys if series[k]]
  if not panels:
    raise ValueError(f"{metrics_jsonl}: none of {list(keys)} is logged")
  cols = min(3, len(panels))
  n_rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(n_rows, cols, figsize=(3.8 * cols, 3.0 * n_rows), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, k in zip(axes.flat, panels):
    shown = []
    for name in (k, f"eval_{k}"):
      if series.get(name):
        steps, values = zip(*series[name])
        shown += values
        ax.plot(steps, values, marker="o" if name.startswith("eval_") else None, ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_title(k)
    tidy_y(ax, shown)
    if k in ("lr",):
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(fontsize=7)
  return _save(fig, path)


def spectrum(sigma: Sequence[float], path: str, title: str = "singular values") -> str:
  """Singular values (descending) on a log scale."""
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  values = [s for s in sigma if s > 0]
  ax.semilogy(range(1, len(values) + 1), values)
  ax.set_xlabel("index k")
  ax.set_ylabel("sigma_k")
  ax.set_title(title)
  return _save(fig, path)


def accuracy_by_length(acc: Mapping, path: str, title: str = "accuracy by length", xlabel: str = "length",
                       ylabel: str = "accuracy (%)") -> str:
  """acc: {length: value} or {series name: {length: value}} (several lines)."""
  if not acc:
    raise ValueError("accuracy_by_length: nothing to plot")
  nested = all(isinstance(v, Mapping) for v in acc.values())
  series = acc if nested else {"": acc}
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  shown = []
  for name, values in series.items():
    xs = sorted(values, key=float)
    ys = [values[x] for x in xs]
    shown += [float(y) for y in ys if y is not None]
    ax.plot([float(x) for x in xs], ys, marker="o", ms=3, label=name or None)
  if shown:
    tidy_y(ax, shown, percent="%" in ylabel)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if nested:
    ax.legend(fontsize=7)
  return _save(fig, path)


def probe_ce(ce_by_offset: Mapping, path: str, title: str = "probe CE by offset",
             ylabel: str = "CE (nats)") -> str:
  """ce_by_offset: {offset: value} or {model name: {offset: value}}."""
  return accuracy_by_length(ce_by_offset, path, title=title, xlabel="offset k", ylabel=ylabel)


def seed_curves(panels: Sequence[Mapping], path: str, xlabel: str = "training rows") -> str:
  """One panel per entry {title, ylabel, lines: {name: {seed: [(x, y)]}}, marks: {label: y}}: each line is
  the mean over its seeds at the x values every seed reached, with a +-1 std band, and a dotted
  horizontal line per mark (e.g. the paper's value, chance)."""
  if not panels:
    raise ValueError("seed_curves: nothing to plot")
  fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    shown = []
    for name, by_seed in panel["lines"].items():
      xs, mean, std = mean_std(by_seed)
      if not xs:
        continue
      line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{name} (n={len(by_seed)})")
      ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                      color=line.get_color(), alpha=0.2, lw=0)
      shown += [m - s for m, s in zip(mean, std)] + [m + s for m, s in zip(mean, std)]
    for k, (label, y) in enumerate(panel.get("marks", {}).items()):
      ax.axhline(y, ls=":", lw=1.2, color=f"C{7 + k % 3}", label=label)
      shown.append(y)
    if shown:
      tidy_y(ax, shown, percent="%" in panel["ylabel"])
    ax.set_xlim(left=0)  # training starts at 0 rows, also when only one evaluation is in
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel["ylabel"])
    ax.set_title(panel["title"], fontsize=10)
    ax.legend(fontsize=7)
  return _save(fig, path)


def mean_std(by_seed: Mapping) -> tuple[list, list[float], list[float]]:
  """(xs, mean, sample std (n - 1; 0 for one seed)) over the seeds of {seed: [(x, y)]}, at the x values all seeds have."""
  tables = [dict(points) for points in by_seed.values()]
  if not tables:
    return [], [], []
  xs = sorted(set.intersection(*(set(t) for t in tables)))
  mean = [sum(t[x] for t in tables) / len(tables) for x in xs]
  std = [(sum((t[x] - m) ** 2 for t in tables) / max(len(tables) - 1, 1)) ** 0.5 for x, m in zip(xs, mean)]
  return xs, mean, std
