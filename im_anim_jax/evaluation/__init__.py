"""Evaluation of each stage on held-out identities (evaluate.py calls these)."""
from __future__ import annotations

import json
import os

from im_anim_jax import media, visualize


def ratio(num: float, den: float, missing: str) -> float | str:
    """num / den, or "not computed: {missing}" when den is 0: an unmeasured figure must not read
    as a measured 0 (no hits, or an output that ignores its input)."""
    return num / den if den > 0 else f"not computed: {missing}"


def write_report(workdir: str, name: str, result: dict, image) -> None:
    """WORKDIR/eval/<name>.png and <name>.json, each written under a temporary name and then
    renamed (media.write_atomic), so a reader never sees half a report."""
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    visualize.write_png(os.path.join(out, f"{name}.png"), image)

    def write(temp):
        with open(temp, "w") as f:
            json.dump(result, f, indent=2)
    media.write_atomic(os.path.join(out, f"{name}.json"), write)
