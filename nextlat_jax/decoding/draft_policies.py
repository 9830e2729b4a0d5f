"""Draft-length policies (spec DECODING.md section 5): how many tokens each row drafts per round.

A policy only decides how many drafts get verified, never how they are accepted, so every policy is
lossless. Kinds:
- fixed: gamma drafts every round (the paper; swept 2..10).
- confidence: draft up to gamma; stop after draft s when max_v q_s(v) < threshold (Hugging Face
  assisted generation's confidence exit, whose default is 0.4).
- cumulative: draft up to gamma; stop after draft s when prod_{j<=s} q_j(x_j) < threshold (EAGLE-2's
  path value).
- adaptive: a per-row length that starts at gamma, grows by `grow` after a round whose drafts were all
  accepted and shrinks by `shrink` after a rejection, within [gamma_min, gamma_max] (the HF heuristic).

Choices where the spec is silent: `gamma` counts every drafted token, in mode A including the exact
first token drawn from the true h (the paper's convention), so thresholds act from position 2 there.
The draft that crosses a threshold is kept (verifying it is cheap). Confidences come from the drafter's
untransformed softmax (temperature 1, no top-k / top-p), so a threshold means the same in greedy mode,
where the sampling q is one-hot.

Static shapes: the drafting buffer holds the decoder's static gamma_max; the policy's numbers are
runtime arrays (`arrays`), so one compiled decoder serves every policy and gamma.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ("fixed", "confidence", "cumulative", "adaptive")


@dataclasses.dataclass(frozen=True)
class DraftPolicy:
  kind: str = "fixed"
  gamma: int = 4  # fixed: the length; confidence / cumulative: the cap; adaptive: the start
  threshold: float = 0.0  # confidence / cumulative only
  gamma_max: int = 10  # adaptive: the largest length
  gamma_min: int = 1  # adaptive: the smallest length
  grow: int = 2  # adaptive: after a fully accepted round
  shrink: int = 1  # adaptive: after a rejection

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"policy={self.kind!r}: unknown draft policy (known: {', '.join(KINDS)})")
    if self.gamma < 1:
      raise ValueError(f"gamma={self.gamma!r}: must be >= 1")
    if self.kind in ("confidence", "cumulative") and not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"threshold={self.threshold!r}: must be in [0, 1] for policy {self.kind}")
    if self.kind == "adaptive" and not 1 <= self.gamma_min <= self.gamma <= self.gamma_max:
      raise ValueError(f"gamma={self.gamma!r}: adaptive needs 1 <= gamma_min={self.gamma_min} <= gamma <= "
                       f"gamma_max={self.gamma_max}")

  @property
  def longest(self) -> int:
    """The most tokens this policy ever drafts in a round."""
    return self.gamma_max if self.kind == "adaptive" else self.gamma

  def label(self) -> str:
    if self.kind == "fixed":
      return f"fixed gamma={self.gamma}"
    if self.kind == "adaptive":
      return f"adaptive start={self.gamma} +{self.grow}/-{self.shrink} in [{self.gamma_min},{self.gamma_max}]"
    return f"{self.kind} <{self.threshold:g} cap={self.gamma}"

  def arrays(self) -> dict[str, Array]:
    """The policy as runtime values for the compiled decoder."""
    adaptive = self.kind == "adaptive"
    return dict(
        gamma=jnp.asarray(self.gamma, jnp.int32),
        lo=jnp.asarray(self.gamma_min if adaptive else self.gamma, jnp.int32),
        hi=jnp.asarray(self.longest, jnp.int32),
        grow=jnp.asarray(self.grow if adaptive else 0, jnp.int32),
        shrink=jnp.asarray(self.shrink if adaptive else 0, jnp.int32),
        conf=jnp.asarray(self.threshold if self.kind == "confidence" else 0.0, jnp.float32),
        cum=jnp.asarray(self.threshold if self.kind == "cumulative" else 0.0, jnp.float32),
    )


def init_lengths(arrays: dict[str, Array], batch: int) -> Array:
  """Every row's draft length before the first round."""
  return jnp.full((batch,), arrays["gamma"], jnp.int32)


def stop_after(arrays: dict[str, Array], confidence_B: Array, path_value_B: Array) -> Array:
  """Whether a row stops drafting after its current draft (max_v q(v), prod of q_j(x_j) so far)."""
  return (confidence_B < arrays["conf"]) | (path_value_B < arrays["cum"])


def update(arrays: dict[str, Array], gamma_B: Array, accepted_B: Array, drafted_B: Array,
           active_B: Array) -> Array:
  """The next round's lengths: grow after full acceptance, shrink after a rejection (adaptive only)."""
  full_B = accepted_B >= drafted_B
  new_B = jnp.where(full_B, gamma_B + arrays["grow"], gamma_B - arrays["shrink"])
  new_B = jnp.clip(new_B, arrays["lo"], arrays["hi"])
  return jnp.where(active_B, new_B, gamma_B)


def presets(gamma_max: int = 10) -> dict[str, DraftPolicy]:
  """The adaptive policies the CLI and benchmark name (thresholds are project choices, not tuned)."""
  return {
      "confidence": DraftPolicy("confidence", gamma=gamma_max, threshold=0.4),
      "cumulative": DraftPolicy("cumulative", gamma=gamma_max, threshold=0.2),
      "adaptive": DraftPolicy("adaptive", gamma=min(5, gamma_max), gamma_max=gamma_max),
  }
