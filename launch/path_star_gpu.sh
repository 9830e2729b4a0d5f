#!/usr/bin/env bash
# One-GPU Path-Star run (issue 17): the paper's G_{5,5} setting, configs/path_star.py's defaults (12 x 384,
# 6 heads, p_psi 384, AdamW lr 5e-4 constant, wd 0.1, clip 100, batch 512, up to 20k steps), NextLat (d = 3)
# first, then GPT. Each trains for at most its seconds: at the limit `timeout` sends SIGTERM and the trainer
# saves at the step boundary. A rerun resumes both runs from their checkpoints. Then greedy and T = 1
# exact-path accuracy on the test graphs (the paper: NextLat 99.8%, GPT 18.6%); DIR/path_star_gpu.json.
#   bash launch/path_star_gpu.sh [DIR] [NEXTLAT_SECONDS=330] [GPT_SECONDS=150] [extra config flags]
# On CPU, the same path on the tiny preset: PRESET=tiny bash launch/path_star_gpu.sh DIR 300 300 --config.steps=20 \
#   --config.checkpoint.every=10   (the tiny preset saves nothing by default)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-runs}/path_star_gpu}
NEXTLAT_S=${2:-330}
GPT_S=${3:-150}
shift $(( $# < 3 ? $# : 3 ))
source launch/device_env.sh
mkdir -p "$DIR"
for run in "nextlat:$NEXTLAT_S" "gpt:$GPT_S"; do
  obj=${run%%:*} seconds=${run##*:} rc=0
  echo "path_star_gpu: $obj, at most $seconds s of training"
  timeout -s TERM -k 60 "$seconds" $PY -m nextlat_jax.cli train --config="configs/path_star.py:$obj${PRESET:+,$PRESET}" \
    --workdir="$DIR/$obj" "$@" || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then  # 124: stopped at the time limit (saved on SIGTERM)
    echo "path_star_gpu: $obj training exited with code $rc" >&2
    exit "$rc"
  fi
  timeout -s TERM 300 $PY -m nextlat_jax.cli eval --workdir="$DIR/$obj" --metrics=all | tee "$DIR/$obj.eval.jsonl"
done
$PY - "$DIR" <<'PYEOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
out = {}
for obj in ("nextlat", "gpt"):
  lines = [json.loads(s) for s in (d / f"{obj}.eval.jsonl").read_text().splitlines() if s.startswith("{")]
  m = next(line["path_star"] for line in reversed(lines) if "path_star" in line)
  out[obj] = {"step": m["step"], "greedy_exact_path": m["greedy/exact_path_accuracy"],
              "sample_t1_exact_path": m["sample_t1/exact_path_accuracy"], "num_examples": m["num_examples"]}
  print(f"path_star_gpu: {obj} at step {m['step']}: exact path greedy {m['greedy/exact_path_accuracy']:.1f}% "
        f"(T=1 {m['sample_t1/exact_path_accuracy']:.1f}%) on {m['num_examples']} test graphs")
(d / "path_star_gpu.json").write_text(json.dumps(out, indent=1))
PYEOF
