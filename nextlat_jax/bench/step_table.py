"""`nextlat bench step`'s printed report: the results table of nextlat_jax.bench.step.run and the lines
under it (noise checks, MFU, compiled memory, the matmul reference, PASS / FAIL)."""
from __future__ import annotations


def _mib(memory: dict | None, breakdown: bool = False) -> str:
  """A step's train/sizes.step_memory (MiB): the total, or every part; "n/a" where XLA reports nothing."""
  if memory is None:
    return "n/a"
  if not breakdown:
    return f"{memory['total']:,.1f}"
  return ", ".join(f"{k} {v:,.1f}" for k, v in memory.items())


def format_table(res: dict) -> str:
  """The results of nextlat_jax.bench.step.run as a Markdown table and the lines under it."""
  mi = res["machine"]
  lines = [f"machine: {mi['nproc']} CPUs, {mi['cpu']}, jax {mi['jax']} ({mi['backend']}); mesh {res['mesh']}",
           f"model: {res['model']}; batch {res['batch_rows']} rows x {res['row_len']} tokens",
           f"rounds {res['bench']['rounds']} x {res['bench']['steps_per_round']} steps per variant "
           "(interleaved); medians; time ratio = median of per-round ratios to GPT; paper time ratio = "
           "GPT steps/s / variant steps/s in the paper's Table 4 (B200, 1.3B)",
           "",
           "| variant | step ms (p25-p75) | steps/s | tok/s | GFLOP/step | time ratio | FLOP ratio | time/FLOP ratio "
           "| GFLOP/s | / matmul | compiled MiB | paper time ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res["variants"]:
    paper = "" if r["paper_time_ratio"] is None else f"{r['paper_time_ratio']:.3f}"
    lines.append(f"| {r['variant']} | {r['step_ms']:.1f} ({r['step_ms_p25']:.1f}-{r['step_ms_p75']:.1f}) "
                 f"| {1e3 / r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {r['flops'] / 1e9:.2f} | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} "
                 f"| {r['time_over_flop_ratio']:.3f} | {r['flops_per_s'] / 1e9:.1f} | {r['matmul_fraction']:.2f} "
                 f"| {_mib(r['memory_mib'])} | {paper} |")
  lines += ["", "time/FLOP ratio by other estimators (noise checks): "
            + "; ".join(f"{r['variant']}: ratio of medians {r['time_ratio_of_medians'] / r['flop_ratio']:.3f}, "
                        f"of minima {r['time_ratio_of_mins'] / r['flop_ratio']:.3f}, "
                        f"process CPU time {r['cpu_time_ratio'] / r['flop_ratio']:.3f}" for r in res["variants"][1:])]
  lines += ["", "compiled MiB: per-device memory of the compiled step as XLA reports it (train/sizes.step_memory: "
            "arguments + outputs + temporaries - aliased): "
            + "; ".join(f"{r['variant']}: {_mib(r['memory_mib'], breakdown=True)}" for r in res["variants"])]
  mm = res["matmul"]
  if res.get("peak_flops_per_device"):
    lines += ["", f"MFU (model FLOPs / ({res['peak_flops_per_device'] / 1e12:.0f} TFLOP/s peak x devices)) and "
              "tokens/s: " + "; ".join(f"{r['variant']}: MFU {r['mfu']:.1%}, {r['tokens_per_s']:,.0f} tok/s"
                                       for r in res["variants"])]
  lines += ["", f"matmul reference (model forward shapes, float32, jitted): {mm['ms']:.2f} ms for "
            f"{mm['flops'] / 1e9:.2f} GFLOP = {mm['flops_per_s'] / 1e9:.1f} GFLOP/s", ""]
  for t in res["targets"]:
    lines.append(f"{'PASS' if t['passed'] else 'FAIL'}  {t['name']}  ({t['value']:.3f} vs {t['limit']:g})")
  return "\n".join(lines)
