"""The stage-3 summary beside the reports in WORKDIR/eval, refreshed by every stage-3 evaluation:

- table.md: the paper's table (rows: this model and the baselines; PSNR*, SSIM, LPIPS, FID, FVD,
  motion PCK@0.1), one section per protocol whose report is present (stage3.json: cross,
  stage3_self.json: self), "n/c [k]" where a metric was not computed, footnote k saying why.
- stage3_history.jsonl: one line {"protocol", "step", "variants": {variant: {metric: value or
  null}}} per (protocol, checkpoint step); a new evaluation of the same pair replaces its line.
- stage3_metrics.png: those figures against step (matplotlib, Agg canvas).

Every file is written under a temporary name, then renamed.
"""
from __future__ import annotations

import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from im_anim_jax import media

REPORTS = {"cross": "stage3", "self": "stage3_self"}  # protocol -> WORKDIR/eval/<name>.json
TITLES = {"cross": "Cross-reenactment (held-out identities driven by held-out motions)",
          "self": "Self-reenactment (each video animates its own first frame)"}
VARIANTS = {"model": "this model", "reference_repeated": "reference repeated",
            "control_zeroed": "control zeroed",
            "vae_reconstruction": "VAE reconstruction (ceiling)"}
# key, column header, decimals
COLUMNS = (("psnr_star", "PSNR* ↑", 2), ("ssim", "SSIM ↑", 3), ("lpips", "LPIPS ↓", 3),
           ("fid", "FID ↓", 2), ("fvd", "FVD ↓", 2), ("motion_pck@0.1", "PCK@0.1 ↑", 3))
TABLE, HISTORY, PLOT = "table.md", "stage3_history.jsonl", "stage3_metrics.png"


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    media.write_atomic(path, write)


def variants(report: dict) -> dict:
    """{variant: figures} of a stage-3 report (the model's at its top level; reports older than
    the ceilings have none)."""
    return {"model": report, **report["baselines"], **report.get("ceilings", {})}


def _cell(value, decimals: int, notes: list) -> str:
    if isinstance(value, str):  # "not computed: ..."
        if value not in notes:
            notes.append(value)
        return f"n/c [{notes.index(value) + 1}]"
    return "—" if value is None else f"{value:.{decimals}f}"


def _samples_line(model: dict, fvd_frames: int) -> str:
    """The sample counts of the model's FID and FVD, and whether they are degenerate."""
    counted = [(name, s, unit, dim) for name, s, unit, dim in (
        ("FID", model.get("fid_samples"), "frames", 2048),
        ("FVD", model.get("fvd_samples"), f"clips of {fvd_frames} frames", 400)) if s]
    if not counted:
        return ""
    text = "; ".join(f"{name} over {s['generated']} generated and {s['ground_truth']} "
                     f"ground-truth {unit}" for name, s, unit, _ in counted) + " (per variant)."
    few = [f"{name} {dim}" for name, s, _, dim in counted if min(s.values()) <= dim]
    if few:
        text += (f" Fewer samples than feature dimensions ({', '.join(few)}): a degenerate "
                 f"Frechet distance, comparable only at equal counts.")
    return "\n\n" + text


def section(protocol: str, report: dict) -> str:
    """The Markdown section of one protocol's report."""
    what = (f"{report['pairs']} pairs" if protocol == "cross"
            else f"{len(report['inputs'])} videos of {report['inputs_dir']}")
    pck = report.get("pck_reference")  # absent from reports older than the protocols
    lines = [f"## {TITLES[protocol]}", "",
             f"Checkpoint step {report['step']}, {what}" + (f"; PCK against {pck}." if pck
                                                            else "."), "",
             "| variant | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    notes = []
    for name, figures in variants(report).items():
        cells = [_cell(figures.get(key), decimals, notes) for key, _, decimals in COLUMNS]
        lines.append(f"| {VARIANTS[name]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + _samples_line(report, report.get("fvd_frames"))
    return text + "".join(f"\n\n[{i}] {n}" for i, n in enumerate(notes, 1))


def write_table(eval_dir: str) -> str:
    """eval_dir/table.md from the stage-3 reports present there; returns its path."""
    sections = []
    for protocol, name in REPORTS.items():
        path = os.path.join(eval_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                sections.append(section(protocol, json.load(f)))
    if not sections:
        raise FileNotFoundError(f"no stage-3 report ({', '.join(REPORTS.values())}.json) in "
                                f"{eval_dir}; run evaluate.py --stage 3 first")
    out = os.path.join(eval_dir, TABLE)
    _write_text(out, "# Stage-3 evaluation\n\n" + "\n\n".join(sections) + "\n")
    return out


def headline(protocol: str, report: dict) -> dict:
    """The history line of a report: the table's figures (null where not computed)."""
    return {"protocol": protocol, "step": report["step"], "variants": {
        name: {key: None if isinstance(figures.get(key), str) else figures.get(key)
               for key, _, _ in COLUMNS} for name, figures in variants(report).items()}}


def read_history(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON ({e}); fix or delete that "
                                 f"line") from None
    return rows


def append_history(path: str, protocol: str, report: dict) -> list[dict]:
    """Adds (or replaces, same protocol and step) the report's line; returns every line, sorted
    by step then protocol."""
    row = headline(protocol, report)
    rows = [r for r in read_history(path)
            if (r["protocol"], r["step"]) != (row["protocol"], row["step"])]
    rows = sorted(rows + [row], key=lambda r: (r["step"], r["protocol"]))
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def plot_history(rows: list[dict], path: str) -> None:
    """One panel per table column, one line per (protocol, variant), against step."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    FigureCanvasAgg(fig)
    styles = {"cross": "-", "self": "--"}
    for ax, (key, header, _) in zip(fig.subplots(2, 3).flat, COLUMNS):
        for protocol in styles:
            for colour, name in enumerate(VARIANTS):
                points = [(r["step"], r["variants"][name][key]) for r in rows
                          if r["protocol"] == protocol and name in r["variants"]
                          and r["variants"][name][key] is not None]
                if points:
                    ax.plot(*zip(*points), styles[protocol], marker="o", color=f"C{colour}",
                            label=f"{protocol}: {VARIANTS[name]}")
        ax.set(title=header, xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    handles, labels = next((a.get_legend_handles_labels() for a in fig.axes if a.lines),
                           ([], []))
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    media.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def update(workdir: str, protocol: str, report: dict) -> None:
    """table.md, the history line of `report` and the plot, in WORKDIR/eval."""
    eval_dir = os.path.join(workdir, "eval")
    write_table(eval_dir)
    rows = append_history(os.path.join(eval_dir, HISTORY), protocol, report)
    plot_history(rows, os.path.join(eval_dir, PLOT))
