"""`nextlat export-hf --workdir=DIR --out=HF_DIR [--step=N]`: a run's trunk as a Hugging Face
LlamaForCausalLM folder (interop/hf_checkpoint.py does the work); a user error is one line, exit 2."""
from __future__ import annotations

import json

from absl import app, flags

from nextlat_jax.errors import fail
from nextlat_jax.interop import hf_checkpoint

FLAGS = flags.FLAGS


def export_command(argv: list[str]) -> None:
  del argv
  if FLAGS.workdir is None or FLAGS.out is None:
    raise app.UsageError("export-hf needs --workdir and --out")
  try:
    print(json.dumps(hf_checkpoint.export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)))
  except (ValueError, FileNotFoundError) as e:
    fail(f"nextlat export-hf: {str(e).removeprefix('export-hf: ')}")
