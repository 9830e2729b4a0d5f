"""Exact weight conversion between the NextLat trunk and Hugging Face `LlamaForCausalLM`.

The trunk (METHOD.md §1) is a Llama: pre-norm RMSNorm blocks, bias-free attention with rotate-half RoPE,
SwiGLU, untied embedding and head. The maps are pure (numpy in, numpy out) and lossless both ways; no
q/k permutation is needed because both sides use the rotate-half (non-interleaved) RoPE layout.

Positions: the first segment of one of our rows starts at RoPE position 1 (each EOS starts a document at
0, METHOD.md §2), while HF's default position_ids start at 0. RoPE scores depend only on position
differences and documents never attend across an EOS, so the offset changes nothing but float rounding;
for bit-level parity pass `position_ids` explicitly (or prepend the EOS: an EOS-led document is 0, 1, ...).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax.core import meta

from nextlat_jax.models.transformer import DTYPES, ModelConfig

# Flax block submodule -> its one parameter; HF keys of buffers that carry no weights (old checkpoints).
_BLOCK_PARAMS = {"attn_norm": "scale", "qkv": "kernel", "out": "kernel", "mlp_norm": "scale",
                 "mlp_in": "kernel", "mlp_out": "kernel"}
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _check(cfg: ModelConfig) -> None:
  """Raises ValueError for settings a Llama checkpoint cannot represent."""
  for key in ("dtype", "param_dtype"):
    if getattr(cfg, key) not in DTYPES:
      raise ValueError(f"hf_llama: model.{key}={getattr(cfg, key)!r} unknown (known: {tuple(DTYPES)})")
  for key in ("vocab_size", "d_model", "n_layer", "n_head", "ffn"):
    if int(getattr(cfg, key)) < 1:
      raise ValueError(f"hf_llama: model.{key}={getattr(cfg, key)!r} must be >= 1")
  if cfg.head_dim < 2 or cfg.head_dim % 2:
    raise ValueError(f"hf_llama: head_dim = d_model // n_head = {cfg.head_dim} must be even and >= 2 "
                     "(rotate-half RoPE)")
  if not (cfg.rope_base > 0 and cfg.norm_eps > 0):
    raise ValueError(f"hf_llama: rope_base={cfg.rope_base!r} and norm_eps={cfg.norm_eps!r} must be > 0")


def _transformers_major() -> int:
  try:
    import transformers
  except ImportError:
    return 5
  return int(transformers.__version__.split(".")[0])


def hf_llama_config_dict(cfg: ModelConfig, *, max_position_embeddings: int = 2048,
                         eos_token_id: int | None = None) -> dict[str, Any]:
  """`transformers.LlamaConfig(**d)` kwargs for the trunk; RoPE/dtype keys follow the installed version.

  `eos_token_id` doubles as BOS: an EOS starts every document of a packed row (METHOD.md §2).
  """
  _check(cfg)
  v5 = _transformers_major() >= 5
  rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)}} if v5
          else {"rope_theta": float(cfg.rope_base)})
  return {"architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
          "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "max_position_embeddings": int(max_position_embeddings), "initializer_range": cfg.init_std,
          "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "attention_bias": False,
          "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": eos_token_id,
          "eos_token_id": eos_token_id, "pad_token_id": None,
          ("dtype" if v5 else "torch_dtype"): cfg.param_dtype, **rope}


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  D, V, A, F = cfg.d_model, cfg.vocab_size, cfg.n_head * cfg.head_dim, cfg.ffn
  shapes = {"model.embed_tokens.weight": (V, D)}
  for i in range(cfg.n_layer):
    pre = f"model.layers.{i}."
    shapes.update({f"{pre}self_attn.{n}_proj.weight": (A, D) for n in "qkv"})
    shapes.update({f"{pre}self_attn.o_proj.weight": (D, A), f"{pre}mlp.gate_proj.weight": (F, D),
                   f"{pre}mlp.up_proj.weight": (F, D), f"{pre}mlp.down_proj.weight": (D, F),
                   f"{pre}input_layernorm.weight": (D,), f"{pre}post_attention_layernorm.weight": (D,)})
  return {**shapes, "model.norm.weight": (D,), "lm_head.weight": (V, D)}


def _blocks(p: Any, cfg: ModelConfig) -> tuple[dict, list[dict]]:
  """(top-level arrays, per-layer {submodule: array}) from either layout, shape-checked against cfg."""
  D, N, Dh, F, L = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ffn, cfg.n_layer
  want = {"attn_norm": (D,), "qkv": (D, 3, N, Dh), "out": (N, Dh, D), "mlp_norm": (D,),
          "mlp_in": (D, 2, F), "mlp_out": (F, D)}
  try:
    top = {"embed": np.asarray(p["embed"]), "head": np.asarray(p["head"]),
           "final_norm": np.asarray(p["final_norm"]["scale"])}
    if cfg.scan_layers:
      stacked = {k: np.asarray(p["blocks"][k][n]) for k, n in _BLOCK_PARAMS.items()}
      ok = all(a.shape == (L,) + want[k] for k, a in stacked.items())
      blocks = [{k: a[i] for k, a in stacked.items()} for i in range(L)] if ok else []
    else:
      blocks = [{k: np.asarray(p[f"block_{i}"][k][n]) for k, n in _BLOCK_PARAMS.items()} for i in range(L)]
      ok = all(a.shape == want[k] for b in blocks for k, a in b.items())
  except (KeyError, TypeError) as e:
    raise ValueError(f"hf_llama: trunk params lack {e} (cfg.scan_layers={cfg.scan_layers})") from None
  top_want = {"embed": (cfg.vocab_size, D), "head": (D, cfg.vocab_size), "final_norm": (D,)}
  if not ok or any(top[k].shape != s for k, s in top_want.items()):
    raise ValueError(f"hf_llama: trunk param shapes do not match {cfg}")
  return top, blocks


def to_hf_llama_state_dict(trunk_params: Any, cfg: ModelConfig, dtype: Any = None) -> dict[str, np.ndarray]:
  """Trunk params (boxed or plain; scan or unrolled per cfg) -> HF Llama state dict.

  Values are fresh C-contiguous writable numpy arrays (never views of the params).

  `dtype`: optional numpy dtype to cast to (default: keep the parameter dtype; bfloat16 stays ml_dtypes).
  """
  _check(cfg)
  top, blocks = _blocks(meta.unbox(trunk_params), cfg)
  arr = lambda a: np.array(a, dtype=dtype, order="C", copy=True)  # owned, writable: torch-ready
  D, A = cfg.d_model, cfg.n_head * cfg.head_dim
  sd = {"model.embed_tokens.weight": arr(top["embed"])}
  for i, b in enumerate(blocks):
    pre = f"model.layers.{i}."
    for j, n in enumerate("qkv"):
      sd[f"{pre}self_attn.{n}_proj.weight"] = arr(b["qkv"][:, j].reshape(D, A).T)
    sd[f"{pre}self_attn.o_proj.weight"] = arr(b["out"].reshape(A, D).T)
    sd[f"{pre}mlp.gate_proj.weight"] = arr(b["mlp_in"][:, 0].T)
    sd[f"{pre}mlp.up_proj.weight"] = arr(b["mlp_in"][:, 1].T)
    sd[f"{pre}mlp.down_proj.weight"] = arr(b["mlp_out"].T)
    sd[f"{pre}input_layernorm.weight"] = arr(b["attn_norm"])
    sd[f"{pre}post_attention_layernorm.weight"] = arr(b["mlp_norm"])
  sd["model.norm.weight"] = arr(top["final_norm"])
  sd["lm_head.weight"] = arr(top["head"].T)
  return sd


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch.Tensor (torch is not imported here)
    v = v.detach().cpu()
    return v.float().numpy().astype(DTYPES["bfloat16"]) if str(v.dtype) == "torch.bfloat16" else v.numpy()
  return np.asarray(v)


def from_hf_llama_state_dict(sd: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """HF Llama state dict (numpy or torch values) -> plain numpy trunk params (cfg.param_dtype, cfg layout)."""
  _check(cfg)
  shapes = _hf_shapes(cfg)
  sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
  missing, extra = sorted(shapes.keys() - sd.keys()), sorted(sd.keys() - shapes.keys())
  if missing or extra:
    tied = " (tied embeddings are unsupported: lm_head.weight is required)" * ("lm_head.weight" in missing)
    raise ValueError(f"hf_llama: state dict does not match cfg: {len(missing)} missing {missing[:4]}, "
                     f"{len(extra)} unexpected {extra[:4]}{tied}")
  w = {k: _to_numpy(v).astype(DTYPES[cfg.param_dtype]) for k, v in sd.items()}
  for k, shape in shapes.items():
    if w[k].shape != shape:
      raise ValueError(f"hf_llama: {k} has shape {w[k].shape}, cfg expects {shape}")
  D, N, Dh = cfg.d_model, cfg.n_head, cfg.head_dim
  c = lambda a: np.ascontiguousarray(a)
  blocks = []
  for i in range(cfg.n_layer):
    g = lambda name: w[f"model.layers.{i}.{name}.weight"]
    blocks.append({"attn_norm": g("input_layernorm"), "mlp_norm": g("post_attention_layernorm"),
                   "qkv": np.stack([g(f"self_attn.{n}_proj").T.reshape(D, N, Dh) for n in "qkv"], axis=1),
                   "out": c(g("self_attn.o_proj").T).reshape(N, Dh, D),
                   "mlp_in": np.stack([g("mlp.gate_proj").T, g("mlp.up_proj").T], axis=1),
                   "mlp_out": c(g("mlp.down_proj").T)})
  params: dict[str, Any] = {"embed": w["model.embed_tokens.weight"], "head": c(w["lm_head.weight"].T),
                            "final_norm": {"scale": w["model.norm.weight"]}}
  if cfg.scan_layers:
    params["blocks"] = {k: {n: np.stack([b[k] for b in blocks])} for k, n in _BLOCK_PARAMS.items()}
  else:
    for i, b in enumerate(blocks):
      params[f"block_{i}"] = {k: {n: b[k]} for k, n in _BLOCK_PARAMS.items()}
  return params
