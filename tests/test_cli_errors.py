"""User mistakes on the `nextlat` command line: exit status 2, one line on stderr naming the mistake, no
traceback, and nothing written (the workdir is not created).

Every case is a `python -m nextlat_jax.cli` subprocess; they run concurrently, started once per module.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = "--config=configs/quickstart.py"

# Config and sweep files with their own mistakes, written to {f}/NAME by the fixture.
BAD_FILES = {
    "syntax.py": "def get_config(:\n  pass\n",
    "no_get_config.py": "x = 1\n",
    "returns_int.py": "def get_config():\n  return 5\n",
    "raises.py": "import ml_collections\n\ndef get_config():\n  raise RuntimeError('no such preset')\n",
    "sweep_syntax.py": "def get_sweep(:\n",
    "sweep_int.py": "def get_sweep():\n  return 5\n",
}
SWEEP = ["sweep", QUICK, "--workdir={w}", "--dry_run"]
# case -> (argv after `nextlat`, with {w} for a workdir that must stay absent; what the error line says)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "unknown_key": (["train", QUICK, "--config.modle.n_layer=2", "--workdir={w}"],
                    ["--config.modle.n_layer", "unknown config key 'modle'", '"model"']),
    "unknown_leaf_key": (["train", QUICK, "--config.model.n_lyer=2", "--workdir={w}"],
                         ["--config.model.n_lyer", "unknown config key 'n_lyer'", '"n_layer"']),
    "missing_config_file": (["train", "--config=configs/no_such_config.py:tiny", "--workdir={w}"],
                            ["no such config file", "configs/no_such_config.py"]),
    "unknown_flag": (["train", QUICK, "--wrokdir={w}"], ["wrokdir", "workdir"]),
    "config_syntax_error": (["train", "--config={f}/syntax.py", "--workdir={w}"],
                            ["syntax.py", "line 1: SyntaxError"]),
    "config_without_get_config": (["train", "--config={f}/no_get_config.py", "--workdir={w}"],
                                  ["no_get_config.py", "defines no get_config()"]),
    "config_returns_int": (["train", "--config={f}/returns_int.py", "--workdir={w}"],
                           ["returns_int.py", "get_config() returned int, not a ConfigDict"]),
    "config_raises": (["train", "--config={f}/raises.py", "--workdir={w}"],
                      ["raises.py", "line 4: RuntimeError: no such preset"]),
    "sweep_syntax_error": (SWEEP + ["--sweep={f}/sweep_syntax.py"], ["--sweep=", "line 1: SyntaxError"]),
    "sweep_returns_int": (SWEEP + ["--sweep={f}/sweep_int.py"], ["--sweep=", "must return a non-empty list"]),
    "batch_size_0": (["train", QUICK, "--config.batch_size=0", "--workdir={w}"], ["batch_size=0: must be >= 1"]),
    "steps_negative": (["train", QUICK, "--config.steps=-1", "--workdir={w}"], ["steps=-1: must be >= 1"]),
    "restore_from_missing": (["train", QUICK, "--config.checkpoint.restore_from={w}_source", "--workdir={w}"],
                             ["checkpoint.restore_from=", "no such folder"]),
    "eval_without_checkpoint": (["eval", "--workdir={w}"], ["config error: workdir=", "no checkpoints folder"]),
    "generate_without_checkpoint": (["generate", "--workdir={w}", "--prompt_ids=2,3"],
                                    ["config error: workdir=", "no checkpoints folder"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, pathlib.Path]]:
  """Each case's finished process and its (absent) workdir; the processes run at the same time."""
  root = tmp_path_factory.mktemp("cli_errors")
  env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu", "HOME": str(root)}
  files = root / "files"
  files.mkdir()
  for name, text in BAD_FILES.items():
    (files / name).write_text(text)
  procs = {}
  for name, (args, _) in CASES.items():
    workdir = root / name
    cmd = [sys.executable, "-m", "nextlat_jax.cli", *(a.format(w=workdir, f=files) for a in args)]
    procs[name] = (cmd, workdir, subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  out = {}
  for name, (cmd, workdir, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    out[name] = (subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), workdir)
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_and_writes_nothing(results, name: str):
  proc, workdir = results[name]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
  for part in CASES[name][1]:
    assert part in lines[0], (part, lines[0])
  assert not workdir.exists(), sorted(workdir.rglob("*"))


def test_unknown_command_says_so_with_usage():
  proc = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "evl", "--workdir=x"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr
  assert lines[0] == "nextlat: unknown command 'evl' (did you mean 'eval'?)", proc.stderr
  assert lines[1].startswith("usage: nextlat <command> [--flags]; commands: train, eval,"), proc.stderr
  assert len(lines) == 2 and "Traceback" not in proc.stderr
  frob = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "frobnicate"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert frob.returncode == 2 and frob.stderr.splitlines()[0] == "nextlat: unknown command 'frobnicate'"
