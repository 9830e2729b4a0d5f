"""The trunk's ModelConfig <-> a Hugging Face LlamaConfig (config.json), and which runs have that form.

`hf_config` writes config.json for the trunk (the RoPE base, the RMSNorm eps, the run's seq_len as
max_position_embeddings, EOS as BOS and EOS); `model_config_from_hf` reads one back and refuses, with
one line naming the config.json field, what the trunk cannot represent (tied embeddings, biases, RoPE
scaling, grouped-query attention, an activation other than SiLU, a head_dim other than D / heads).
Only runs whose next-token model is the trunk alone (GPT, NextLat: `llama_trunk`) map onto a Llama.
"""
from __future__ import annotations

from typing import Any

from nextlat_jax.interop import hf_llama
from nextlat_jax.models.transformer import ModelConfig, Transformer
from nextlat_jax.run import Run

TRUNK_OBJECTIVES = ("gpt", "nextlat")  # objectives whose next-token model is the trunk alone


def llama_trunk(run: Run) -> Any:
  """params["trunk"] of a loaded run whose next-token model is a plain Transformer trunk (GPT, NextLat);
  other runs are refused (their next-token model reads more than the trunk)."""
  name = run.config.objective.name
  if name not in TRUNK_OBJECTIVES:
    raise ValueError(f"objective.name={name!r}: its next-token model is not the trunk alone "
                     f"(supported: {TRUNK_OBJECTIVES})")
  if type(run.objective.modules.get("trunk")) is not Transformer:
    raise ValueError(f"objective.name={name!r}: the trunk is not a plain Transformer")
  return run.params["trunk"]


def hf_config(cfg: ModelConfig, *, max_position_embeddings: int, eos_token_id: int | None) -> dict:
  """config.json for the trunk, readable by transformers 4.x and 5.x (both RoPE and dtype spellings)."""
  d = hf_llama.hf_llama_config_dict(cfg, max_position_embeddings=max_position_embeddings,
                                    eos_token_id=eos_token_id)
  d.pop("dtype", None)
  d.pop("torch_dtype", None)
  d.pop("rope_parameters", None)
  return {"model_type": "llama", **d, "rope_theta": float(cfg.rope_base),
          "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
          "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype}


def _refuse(field: str, value: Any, why: str) -> None:
  raise ValueError(f"import-hf: config.json {field}={value!r}: {why}")


def _rope_type(rope: dict) -> str:
  return rope.get("rope_type", rope.get("type", "default"))


def model_config_from_hf(hf: dict, *, scan_layers: bool = True, param_dtype: str = "float32",
                         dtype: str = "float32") -> ModelConfig:
  """The trunk's ModelConfig for an HF Llama config.json dict; refuses what the trunk cannot represent."""
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    _refuse("model_type", model_type, "only Llama checkpoints (LlamaForCausalLM) are supported")
  try:
    D, N, L = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    V, F = int(hf["vocab_size"]), int(hf["intermediate_size"])
  except KeyError as e:
    raise ValueError(f"import-hf: config.json lacks {e.args[0]!r}") from None
  checks = [("tie_word_embeddings", False, "tied embeddings: the trunk has a separate output head"),
            ("attention_bias", False, "the trunk's attention has no biases"),
            ("mlp_bias", False, "the trunk's MLP has no biases"),
            ("hidden_act", "silu", "the trunk's MLP is SwiGLU (silu)"),
            ("num_key_value_heads", N, f"grouped-query attention: the trunk has {N} key/value heads"),
            ("head_dim", D // N, f"the trunk's head_dim is hidden_size // num_attention_heads = {D // N}"),
            ("rope_scaling", None, "RoPE scaling is not supported (default RoPE only)"),
            ("partial_rotary_factor", 1.0, "the trunk rotates the whole head")]
  for field, want, why in checks:
    value = hf.get(field)
    if value is None or (field == "rope_scaling" and _rope_type(value) == "default"):
      value = want
    if value != want and not (field == "hidden_act" and value == "swish"):
      _refuse(field, value, why)
  if D % N:
    _refuse("hidden_size", D, f"not divisible by num_attention_heads={N}")
  rope = hf.get("rope_parameters") or {}
  rope_type = _rope_type(rope)
  if rope_type != "default":
    _refuse("rope_parameters.rope_type", rope_type, "RoPE scaling is not supported (default RoPE only)")
  rope_base = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  cfg = ModelConfig(vocab_size=V, d_model=D, n_layer=L, n_head=N, ffn_width=F, rope_base=rope_base,
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)), init_std=float(hf.get("initializer_range", 0.02)),
                    scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype)
  hf_llama.hf_llama_config_dict(cfg)  # the converter's own checks (even head_dim, positive sizes)
  return cfg


def check_model_matches(model: Any, hf_cfg: ModelConfig) -> None:
  """Refuses, in one line listing the --config.model overrides it needs, a config.model that cannot hold
  the HF trunk `hf_cfg`."""
  fields = {"vocab_size": hf_cfg.vocab_size, "d_model": hf_cfg.d_model, "n_layer": hf_cfg.n_layer,
            "n_head": hf_cfg.n_head, "rope_base": hf_cfg.rope_base, "norm_eps": hf_cfg.norm_eps}
  ours = ModelConfig.from_config(model)
  bad = [f"--config.model.{k}={v}" for k, v in fields.items() if getattr(ours, k) != v]
  if ours.ffn != hf_cfg.ffn:
    bad.append(f"--config.model.ffn_width={hf_cfg.ffn}")
  if bad:
    raise ValueError(f"import-hf: config.model does not match the HF model; pass {' '.join(bad)}")
