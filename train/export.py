"""Export an adapter: to PEFT format, or merged into its base as a plain Hugging Face checkpoint.

    python -m train.export --adapter runs/demo/adapter --base data/demo_base --peft out/peft_adapter
    python -m train.export --adapter runs/demo/adapter --base data/demo_base --merged out/merged_model
    python -m train.export --from-peft path/to/peft_adapter --base facebook/bart-base --adapter-out out/adapter
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
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
    args = ap.parse_args(argv)

    import lora_jax
    from lora_jax import distributed
    from lora_jax.checkpoints.adapter import check_adapter_fits, load_adapter, save_adapter
    from lora_jax.checkpoints.merged import export_merged
    from lora_jax.generation import load_generation_config
    from lora_jax.checkpoints.peft import export_peft, import_peft

    try:
        # Launched as several processes (srun, a pod): every process reads, process 0 alone writes plain files, and
        # all of them join the Orbax save of --adapter-out.
        distributed.initialize()
        main = distributed.is_main_process()
        model, base = lora_jax.load_pretrained(args.base)
        if args.adapter:
            adapter, config, _ = load_adapter(args.adapter, base_params=base)
        else:
            adapter, config = import_peft(args.from_peft)
            check_adapter_fits(adapter, base)
        params = lora_jax.combine(base, adapter)
        local_base = args.base if os.path.isdir(args.base) else None
        if args.peft:
            out = export_peft(args.peft, params, config, args.base) if main else args.peft
        elif args.merged:
            gen = load_generation_config(local_base) if local_base else None
            out = (export_merged(args.merged, params, config, model.config, tokenizer_dir=local_base,
                                 generation_config=gen) if main else args.merged)
        else:
            out = save_adapter(args.adapter_out, params, config, base_model=args.base, base_params=base)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    distributed.barrier("lora_jax.export.done")  # no process reports success before process 0 has written
    if main:
        print(json.dumps({"written": out, "lora": config.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
