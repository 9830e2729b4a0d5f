"""`nextlat <command> --help` lists that command's flags once each: the shared flags it reads
(nextlat_jax.cli.TAKES) and the flags of its own module(s), none of another command's.

Every command's --help is a `python -m nextlat_jax.cli` subprocess (each imports only its command's
module); they run concurrently, started once per module.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from nextlat_jax import bench, cli, cli_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
# Flags each command must list as its own (a sample; the shared ones are checked against TAKES).
OWN: dict[str, tuple[str, ...]] = {
    "train": (),
    "eval": ("eval_steps", "metrics", "task", "num_samples", "probe_steps"),
    "prepare": ("input", "output", "seq_len", "tokenizer"),
    "generate": ("prompt", "prompt_ids", "max_new_tokens", "speculative"),
    "info": (),
    "compile-check": ("mesh",),
    "sweep": ("sweep", "launcher", "dry_run"),
    "bench": (),
    "bench step": (),
    "bench decode": (),
    "bench checkpoint": ("bench_steps", "bench_saves"),
    "bench data": ("data_bench_tokens", "data_bench_seq_len"),
    "lm-eval": ("tasks", "limit", "lm_eval_batch_size"),
    "export-hf": (),
    "import-hf": ("hf_dir",),
}
FLAG_LINE = re.compile(r"^  --(?:\[no\])?(\w+):", re.MULTILINE)


def module_of(command: str) -> str:
  """The module behind a command ("bench step": the bench module and the sub-command's name)."""
  return cli.COMMANDS[command.split(" ")[0]][0].split(":")[0] + (
      f" {command.split(' ', 1)[1]}" if " " in command else "")


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
  """Each command's finished `--help` process; the processes run at the same time."""
  home = tmp_path_factory.mktemp("cli_help")
  env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu", "HOME": str(home)}
  procs = {name: subprocess.Popen([sys.executable, "-m", "nextlat_jax.cli", *name.split(" "), "--help"], cwd=REPO,
                                  env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name in cli.TAKES}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  return out


def test_every_command_and_sub_command_is_described():
  commands = set(cli.COMMANDS) | {f"bench {name}" for name in bench.SUBCOMMANDS}
  assert set(cli.TAKES) == set(OWN) == commands
  assert all(set(shared) <= set(cli_flags.SHARED) for shared in cli.TAKES.values())


@pytest.mark.parametrize("name", list(OWN))
def test_help_lists_the_commands_flags_once(helps, name: str):
  proc = helps[name]
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stdout.startswith(f"nextlat {cli.COMMANDS[name.split(' ')[0]][1]}\n"), proc.stdout
  shown = FLAG_LINE.findall(proc.stdout)
  assert len(shown) == len(set(shown)), f"listed twice: {sorted({f for f in shown if shown.count(f) > 1})}"
  assert {f for f in shown if f in cli_flags.SHARED} == set(cli.TAKES[name]), shown
  assert set(OWN[name]) <= set(shown), (OWN[name], shown)
  assert "logtostderr" not in shown and "verbosity" not in shown  # absl's own flags stay out
  # No other command's flags, unless both commands are functions of one module (COMMANDS), which
  # defines one set of flags for both.
  others = {f for other in OWN if module_of(other) != module_of(name) for f in OWN[other]} - set(OWN[name])
  assert not others & set(shown), f"{name} --help lists other commands' flags: {sorted(others & set(shown))}"


def test_bench_help_names_its_sub_commands(helps):
  line = [ln for ln in helps["bench"].stdout.splitlines() if ln.startswith("sub-commands:")]
  assert line and all(name in line[0] for name in bench.SUBCOMMANDS), helps["bench"].stdout


def test_bench_help_lists_each_sub_commands_settings(helps):
  text = helps["bench"].stdout
  assert "sub-commands and their settings" in text, text
  for name in bench.SUBCOMMANDS:
    assert f"  bench {name} " in text, name
    shown = bench.settings(name)
    assert shown, name
    for key, default, _ in shown:
      assert f"      {key}={default}" in text, (name, key)
  assert "      --bench_steps=8  (bench checkpoint: timed train steps.)" in text
  assert "      prompt_len=16" in text and "      --config.bench.rounds=10" in text


def test_eval_help_documents_the_metrics_and_their_sizes(helps):
  text = " ".join(helps["eval"].stdout.split())  # absl wraps the help text
  for words in ("'default': effective rank only", "'all': rank and every metric family", "next_token, "
                "valid_trajectories, compression, detours", "pairs for valid_trajectories", "progress bar with ETA"):
    assert words in text, words


def test_a_shared_flag_the_command_does_not_read_is_refused(tmp_path: pathlib.Path):
  """`eval` reads no --config: a one-line unknown-flag error (exit 2), not a silently ignored flag."""
  proc = subprocess.run([sys.executable, "-m", "nextlat_jax.cli", "eval", "--config=configs/quickstart.py",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu",
                             "HOME": str(tmp_path)})
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0] == "nextlat eval: Unknown command line flag 'config'", lines
  assert not (tmp_path / "run").exists()
