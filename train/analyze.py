"""`python -m train.analyze`: the LoRA paper's Section 7 analysis of trained adapters, to choose a rank.

    python -m train.analyze --adapter runs/r16/adapter [--compare runs/r4/adapter] [--base data/demo_base] \
        [--layers 'q_proj|v_proj'] --out runs/analysis

Writes to --out: analysis.json (per adapted module: dW's singular values and cumulative energy; with --base, the
amplification numbers; with --compare, the subspace similarity phi(i, j) of the two adapters' A matrices),
spectrum.png (cumulative energy of dW against the number of directions kept) and, with --compare,
subspace_similarity.png (phi heat maps like the paper's Figure 3). See lora_jax/lora/analysis.py for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

import lora_jax
from lora_jax.lora import analysis

MAX_HEATMAPS = 4  # modules drawn in subspace_similarity.png (all are in the JSON)


def plot_spectra(report: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    curves = [np.asarray(entry["cumulative_energy"]) for entry in report.values()]
    for curve in curves:
        ax.plot(np.arange(1, len(curve) + 1), curve, color="tab:blue", alpha=0.25, lw=0.8)
    if len({len(c) for c in curves}) == 1:
        mean = np.mean(curves, axis=0)
        ax.plot(np.arange(1, len(mean) + 1), mean, color="black", lw=2, label=f"mean over {len(curves)} modules")
        ax.legend()
    ax.set_xlabel("directions of dW kept (i)")
    ax.set_ylabel("share of ||dW||_F^2 in the top i")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_similarity(similarity: dict[str, np.ndarray], path: str, names: tuple[str, str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(similarity)[:MAX_HEATMAPS]
    fig, axes = plt.subplots(1, len(modules), figsize=(3.4 * len(modules) + 1, 3.4), dpi=100, squeeze=False,
                             layout="constrained")
    for ax, module in zip(axes[0], modules):
        phi = similarity[module]
        image = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", origin="upper",
                          extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(module.replace("model/", ""), fontsize=7)
        ax.set_xlabel(f"j ({names[1]})", fontsize=8)
        ax.set_ylabel(f"i ({names[0]})", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="phi(i, j)")
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> dict:
    if args.layers is not None:
        try:
            re.compile(args.layers)
        except re.error as e:
            raise ValueError(f"--layers {args.layers!r} is not a valid regex: {e}") from None
    base = lora_jax.load_pretrained(args.base)[1] if args.base else None
    adapter, config, _ = lora_jax.load_adapter(args.adapter, base_params=base)
    os.makedirs(args.out, exist_ok=True)
    result = {"adapter": args.adapter, "modules": analysis.analyze_adapter(adapter, config, base, args.layers)}
    if not result["modules"]:
        raise ValueError(f"--layers {args.layers!r} matches no adapted module of {args.adapter}")
    files = {"json": os.path.join(args.out, "analysis.json"),
             "spectrum": plot_spectra(result["modules"], os.path.join(args.out, "spectrum.png"))}
    if args.compare:
        other, other_config, _ = lora_jax.load_adapter(args.compare, base_params=base)
        similarity = analysis.compare_adapters(adapter, config, other, other_config, args.layers)
        if not similarity:
            raise ValueError(f"{args.adapter} and {args.compare} adapt no module in common")
        result.update(compare=args.compare, subspace_similarity={m: phi.tolist() for m, phi in similarity.items()})
        files["similarity"] = plot_similarity(similarity, os.path.join(args.out, "subspace_similarity.png"),
                                              (os.path.basename(os.path.dirname(os.path.abspath(args.adapter))),
                                               os.path.basename(os.path.dirname(os.path.abspath(args.compare)))))
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=1)
    return {"files": files, **summarize(result)}


def summarize(result: dict) -> dict:
    """Medians over modules: energy in the top direction, amplification, phi(1, 1) and phi(r1, r2)."""
    modules = result["modules"].values()
    out = {"modules": len(result["modules"]),
           "median_top1_energy": float(np.median([m["cumulative_energy"][0] for m in modules]))}
    if all("amplification" in m for m in modules):
        out["median_amplification"] = float(np.median([m["amplification"] for m in modules]))
    if "subspace_similarity" in result:
        phis = [np.asarray(p) for p in result["subspace_similarity"].values()]
        out.update(median_phi_1_1=float(np.median([p[0, 0] for p in phis])),
                   median_phi_full=float(np.median([p[-1, -1] for p in phis])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.analyze", description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="a lora_jax adapter directory")
    ap.add_argument("--compare", help="a second adapter (another rank or seed) for the subspace similarity")
    ap.add_argument("--base", help="the base model directory, for the amplification numbers (and a fit check)")
    ap.add_argument("--layers", help="regex over module paths, e.g. 'encoder/layers/2/.*(q_proj|v_proj)'")
    ap.add_argument("--out", required=True, help="directory for analysis.json and the PNGs")
    args = ap.parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
