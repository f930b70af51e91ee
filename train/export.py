"""Export an adapter: to PEFT format, or merged into its base as a plain Hugging Face checkpoint.

    python -m train.export --adapter runs/demo/adapter --base data/demo_base --peft out/peft_adapter
    python -m train.export --adapter runs/demo/adapter --base data/demo_base --merged out/merged_model
    python -m train.export --from-peft path/to/peft_adapter --base facebook/bart-base --adapter-out out/adapter

The output directory must be new or empty: an export never writes beside other files (a directory holding a PEFT
adapter and a merged model would be read as either). --overwrite replaces a non-empty one: the export is written to a
temporary directory beside it, which then takes its place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DESTINATIONS = ("peft", "merged", "adapter_out")


def destination_problem(args) -> str | None:
    """Why the output directory cannot be written (None: it can), checked before any work is done."""
    flag = next(f for f in DESTINATIONS if getattr(args, f))
    out = getattr(args, flag)
    name = "--" + flag.replace("_", "-")
    sources = [p for p in (args.adapter, args.from_peft, args.base) if p and os.path.exists(p)]
    if any(os.path.realpath(out) == os.path.realpath(p) for p in sources):
        return f"{name} {out} is the directory the export reads from; write the export to another directory"
    from lora_jax.checkpoints.files import directory_entries

    try:
        entries = directory_entries(out)
    except FileExistsError as e:
        return f"{name}: {e}"
    if entries and not args.overwrite:
        held = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        return (f"{name} {out} is not empty (it holds {held}); an export never writes beside other files. Choose a new "
                "or empty directory, or pass --overwrite to replace this one")
    return None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Convert a lora_jax adapter (Orbax, written by training to <output_dir>/adapter) to a PEFT adapter "
        "or to a merged Hugging Face checkpoint, or import a PEFT adapter (e.g. trained in PyTorch).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="lora_jax adapter directory")
    src.add_argument("--from-peft", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--base", required=True, help="base checkpoint directory or hub id the adapter was trained on")
    dst = ap.add_mutually_exclusive_group(required=True)
    dst.add_argument("--peft", help="write a PEFT adapter here (loadable by peft.PeftModel.from_pretrained)")
    dst.add_argument("--merged", help="write the merged model here: model.safetensors (PyTorch layout), "
                     "flax_model.msgpack, config.json, generation_config.json, tokenizer files")
    dst.add_argument("--adapter-out", help="write a lora_jax adapter here (with --from-peft)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the output directory if it is not empty (the new export takes its place whole)")
    return ap


def write_export(args, main_process: bool):
    """Loads the base and the adapter and writes the export (plain files from process 0 only); returns (the directory
    written, the LoraConfig)."""
    import lora_jax
    from lora_jax.checkpoints.adapter import load_adapter, save_adapter
    from lora_jax.checkpoints.files import write_directory
    from lora_jax.checkpoints.merged import export_merged
    from lora_jax.checkpoints.peft import export_peft, import_peft
    from lora_jax.generation import load_generation_config

    model, base = lora_jax.load_pretrained(args.base)
    if args.adapter:
        adapter, config, _ = load_adapter(args.adapter, base_params=base)
    else:
        adapter, config = import_peft(args.from_peft, base_params=base, base_model=args.base)
    params = lora_jax.combine(base, adapter)
    local_base = args.base if os.path.isdir(args.base) else None
    if args.peft and main_process:
        write_directory(args.peft, lambda d: export_peft(d, params, config, args.base, base_params=base))
    elif args.merged and main_process:
        gen = load_generation_config(local_base) if local_base else None
        write_directory(args.merged, lambda d: export_merged(d, params, config, model.config, tokenizer_dir=local_base,
                                                             generation_config=gen))
    elif args.adapter_out:
        # save_adapter writes beside and renames into place itself, and every process joins its Orbax save
        save_adapter(args.adapter_out, params, config, base_model=args.base, base_params=base)
    return next(getattr(args, f) for f in DESTINATIONS if getattr(args, f)), config

def main(argv=None) -> int:
    args = parser().parse_args(argv)
    problem = destination_problem(args)
    if problem:
        print(f"export failed: {problem}", file=sys.stderr)
        return 2

    from lora_jax.sharding import distributed

    try:
        # Launched as several processes (srun, a pod): every process reads, process 0 alone writes plain files, and
        # all of them join the Orbax save of --adapter-out.
        distributed.initialize()
        main_process = distributed.is_main_process()
        out, config = write_export(args, main_process)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    distributed.barrier("lora_jax.export.done")  # no process reports success before process 0 has written
    if main_process:
        print(json.dumps({"written": out, "lora": config.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
