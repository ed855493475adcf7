"""Wan2.2 TI2V-5B DiT: parameter count and per-device parameter memory on an 8-device fsdp mesh,
from an abstractly compiled sharded init (nothing is allocated; CPU devices are simulated).

  python benchmarks/dit_params.py [--fsdp=8] [--preset=wan2_2_ti2v_5b]

The mesh is im_anim_jax.sharding.make_mesh(config.mesh) of the `paper` config with its shape
overridden to fsdp=N (data=context=tensor=1) and the config's logical-axis rules; parameters get
their shardings from their logical axis names (sharding.param_shardings). Prints the count, the
float32 total, XLA's memory_analysis of the compiled init (output bytes = one device's params),
the ideal total/N, and the largest parameters left replicated. Final line: JSON.
"""
import argparse
import os
import sys

if __name__ == "__main__":  # before jax is imported: simulated host devices
    _n = next((a.split("=")[1] for a in sys.argv if a.startswith("--fsdp=")), "8")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}")

import json  # noqa: E402
import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]
import im_animation  # noqa: E402

from im_anim_jax import sharding  # noqa: E402
from im_anim_jax.models.wan import dit  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdp", type=int, default=8, help="devices on the fsdp axis (use --fsdp=N)")
    p.add_argument("--preset", default="wan2_2_ti2v_5b", choices=("wan2_2_ti2v_5b", "demo", "tiny"))
    args = p.parse_args()
    if jax.device_count() != args.fsdp:
        raise SystemExit(f"{jax.device_count()} devices, expected {args.fsdp}: pass --fsdp=N "
                         f"(with '=') so the device count is set before jax starts")
    config = im_animation.get_config("paper")
    config.model.dit = im_animation.wan_dit(args.preset)
    config.mesh.shape.update(dict(data=1, fsdp=args.fsdp, context=1, tensor=1))
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.mesh)

    model = dit.build_dit(config.model.dit, remat_policy=config.model.remat_policy)
    inputs = dit.init_inputs(config.model.dit, batch=args.fsdp)

    def init(key):
        return model.init(key, *inputs)["params"]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, jax.random.key(0))
        shardings = sharding.param_shardings(boxed, mesh, rules)
        compiled = jax.jit(lambda k: nn.unbox(init(k)), out_shardings=shardings).lower(
            jax.random.key(0)).compile()
    abstract = nn.unbox(boxed)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    mem = compiled.memory_analysis()
    replicated = sorted(
        ((math.prod(x.shape), jax.tree_util.keystr(path))
         for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                 jax.tree.leaves(shardings))
         if s.is_fully_replicated), reverse=True)
    out = {
        "preset": args.preset, "devices": jax.device_count(), "params": count,
        "params_gib_fp32": total / 2 ** 30,
        "per_device_params_gib": mem.output_size_in_bytes / 2 ** 30,
        "ideal_per_device_gib": total / args.fsdp / 2 ** 30,
        "init_temp_gib": mem.temp_size_in_bytes / 2 ** 30,
        "replicated_params": sum(n for n, _ in replicated),
        "largest_replicated": [f"{name} ({n})" for n, name in replicated[:3]],
    }
    for k, v in out.items():
        print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
