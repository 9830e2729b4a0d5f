"""`nextlat import-hf --hf_dir=HF_DIR --out=DIR --config=configs/x.py`: a step-0 checkpoint whose trunk
is a Hugging Face Llama (interop/hf_checkpoint.py does the work); a user error is one line, exit 2."""
from __future__ import annotations

import json

from absl import app, flags

from nextlat_jax.errors import fail
from nextlat_jax.interop import hf_checkpoint

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "A Hugging Face LlamaForCausalLM folder (config.json + safetensors).")


def import_command(argv: list[str]) -> None:
  del argv
  if FLAGS.hf_dir is None or FLAGS.out is None or FLAGS.config is None:
    raise app.UsageError("import-hf needs --hf_dir, --out and --config (the config the fine-tuning run will use)")
  try:
    print(json.dumps(hf_checkpoint.write_init_checkpoint(FLAGS.config, FLAGS.hf_dir, FLAGS.out)))
  except (ValueError, FileNotFoundError) as e:
    fail(f"nextlat import-hf: {str(e).removeprefix('import-hf: ')}")
