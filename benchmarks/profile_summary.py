"""Where a profiled step spends its device time: the top kernels and the model scopes they come
from, read from a jax.profiler perfetto trace (no TensorBoard/xprof needed).

  python benchmarks/profile_summary.py runs/scaling/profile [--hlo step.hlo.txt[.gz]] [--top 25]

TRACE is a `perfetto_trace.json.gz` or a directory holding one (jax.profiler.trace(dir,
create_perfetto_trace=True), as `scaling.py --profile` writes). Device events are those of the
processes named /device:... (GPU/TPU streams); with no device process (CPU) the host's XLA
events are used. With the compiled step's HLO text (`--hlo`; scaling.py passes it in process),
each kernel's HLO instruction is mapped to its `op_name` metadata (jit(step)/.../dit/blocks/...)
and the time is also summed by model scope, `--depth` module names deep (plan.op_scope). On GPU,
library kernels (cuBLAS, cuDNN) inside CUDA graphs carry only their command buffer's name and
land in '(no HLO name)': profile with XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute
every kernel (measured: the same step time on the H200).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from im_anim_jax import plan  # noqa: E402

_HLO_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', re.M)
_KERNEL_N = re.compile(r"_(\d+)$")


def find_trace(path: str) -> str:
    """The newest perfetto_trace.json.gz at or under `path`."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}: profile with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def device_events(trace: str) -> list[dict]:
    """The complete ('X') events of the device processes (the host's XLA ops when none)."""
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {p for p, n in procs.items() if n.startswith("/device:")}
    keep = device or set(procs)
    return [e for e in events if e.get("ph") == "X" and e["pid"] in keep
            and (device or not e["name"].startswith(("$", "Pjit", "Thunk", "Common", "Slinky")))]


def op_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata, for the whole module text."""
    return {m.group(1): m.group(2) for m in _HLO_OP.finditer(hlo_text)}


def summarize(trace: str, hlo_text: str | None = None, top: int = 25, depth: int = 2) -> dict:
    """{'busy_ms', 'span_ms', 'kernels': [(name, ms, share)], 'scopes': [(scope, ms, share)]}:
    device busy time (summed over streams), the span first-start to last-end, and the `top`
    kernels and scopes by time."""
    events = device_events(find_trace(trace))
    if not events:
        raise ValueError(f"{trace}: no device or XLA events in the trace")
    busy = sum(e["dur"] for e in events)
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    by_kernel = collections.Counter()
    by_scope = collections.Counter()
    ops = op_scopes(hlo_text) if hlo_text else {}
    for e in events:
        args = e.get("args", {})
        op = args.get("hlo_op") or args.get("long_name", "").split(" ")[0] or e["name"]
        by_kernel[e["name"] if op == e["name"] else f"{e['name']} [{op}]"] += e["dur"]
        if ops:  # a kernel of a command buffer is named like its HLO fusion, "_N" for ".N"
            name = ops.get(op) or ops.get(e["name"]) or ops.get(_KERNEL_N.sub(r".\1", e["name"]))
            by_scope[plan.op_scope(name or "", depth)] += e["dur"]

    def rows(counter):
        return [(k, v / 1e3, v / busy) for k, v in counter.most_common(top)]
    return {"busy_ms": busy / 1e3, "span_ms": span / 1e3, "kernels": rows(by_kernel),
            "scopes": rows(by_scope)}


def report(summary: dict) -> str:
    lines = [f"device busy {summary['busy_ms']:.1f} ms over a span of {summary['span_ms']:.1f} ms"]
    for title, key in (("kernels", "kernels"), ("model scopes", "scopes")):
        if summary[key]:
            lines.append(f"top {title} by device time:")
            lines += [f"  {ms:10.2f} ms {share:6.1%}  {name[:110]}" for name, ms, share
                      in summary[key]]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="perfetto_trace.json.gz or a directory holding one")
    p.add_argument("--hlo", default=None, help="the compiled step's HLO text (scope grouping)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--depth", type=int, default=2, help="scope components to group by")
    args = p.parse_args()
    try:
        hlo = None
        if args.hlo:
            with (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "rt") as f:
                hlo = f.read()
        print(report(summarize(args.trace, hlo, args.top, args.depth)))
    except (OSError, ValueError, KeyError) as e:  # missing/corrupt trace or HLO file
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
