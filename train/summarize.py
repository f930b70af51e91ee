"""Summarize rows with many adapters at once: each row names its adapter, batches mix them (one base in memory).

    python -m train.summarize --base data/demo_base --adapter docs=runs/demo/adapter --adapter peft=out/peft \\
        --input rows.jsonl --output out.jsonl --num-beams 4 --max-new-tokens 48
    printf 'First line.\\nSecond line.\\n' | python -m train.summarize --base data/demo_base

Input rows are JSON objects {"text": ..., "adapter": NAME} (a row without "adapter", or with null, uses the base);
from stdin (no --input, or --input -) a line that is not a JSON object is taken as the text itself. Output rows are
the input rows plus "summary", in input order. Generation settings default to the base checkpoint's (its
generation_config.json, else the generation keys of its config.json); when they ask for num_return_sequences > 1,
"summary" is a list of that many strings (best beam first), and sampling (do_sample) draws from --seed.
lora_jax adapter directories and PEFT ones (adapter_config.json) are both accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m train.summarize",
        description="Generate summaries for JSON-lines rows, each with its own LoRA adapter, in mixed batches over one "
        "frozen base (lora_jax.generation.serving.AdapterServer: one compiled program per input shape).",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--base", required=True, help="base checkpoint directory (or hub id) the adapters were trained on")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="an adapter rows can name (lora_jax or PEFT directory); repeatable")
    ap.add_argument("--input", default="-", help="JSON-lines file, or - for stdin (default)")
    ap.add_argument("--output", default="-", help="JSON-lines file to write, or - for stdout (default)")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--adapter-column", default="adapter")
    ap.add_argument("--summary-column", default="summary")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per generate call (mixed adapters)")
    ap.add_argument("--max-source-length", type=int, default=None,
                    help="inputs are truncated to this many tokens (default and most: the model's max_position_embeddings)")
    ap.add_argument("--method", default="gather", choices=["gather", "grouped"], help="per-example adapter matmul")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed when the settings sample (do_sample)")
    for flag, kind in (("--num-beams", int), ("--max-new-tokens", int), ("--length-penalty", float),
                       ("--no-repeat-ngram-size", int), ("--min-length", int), ("--num-return-sequences", int)):
        ap.add_argument(flag, type=kind, help="overrides the base's generation_config.json")
    return ap.parse_args(argv)


def parse_adapter_specs(specs) -> dict[str, str]:
    """["name=dir", ...] -> {name: dir}; a malformed or repeated name is an error naming it."""
    out = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter legal=runs/legal/adapter")
        if name in out:
            raise ValueError(f"--adapter {name!r} is given twice")
        out[name] = directory
    return out


def read_rows(lines, text_column: str, adapter_column: str, names, plain_text: bool) -> list[dict]:
    """JSON rows, checked: each needs a string `text_column` and an `adapter_column` (if present) among `names`.
    With plain_text (stdin), a line that is not a JSON object becomes {text_column: line}."""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not plain_text:
                raise ValueError(f"row {number}: not JSON ({e}); write one JSON object a line") from None
            row = None
        if not isinstance(row, dict):
            if not plain_text:
                raise ValueError(f"row {number}: expected a JSON object with {text_column!r}, got {line.strip()[:60]!r}")
            row = {text_column: line.rstrip("\n")}
        if not isinstance(row.get(text_column), str):
            raise ValueError(f"row {number}: no string {text_column!r} field (keys: {sorted(row)}); "
                             "use --text-column to name the text field")
        adapter = row.get(adapter_column)
        if adapter is not None and adapter not in names:
            raise ValueError(f"row {number}: adapter {adapter!r} was not given; known: {sorted(names)} "
                             "(add --adapter NAME=DIR)")
        rows.append(row)
    return rows


def load_any_adapter(directory: str, base, base_model: str | None = None):
    """(adapter tree, LoraConfig) of a PEFT adapter directory (adapter_config.json) or a lora_jax one, checked
    against the base (lora_jax.checkpoints.peft.load_any_adapter, which train.evaluate uses too)."""
    from lora_jax.checkpoints.peft import load_any_adapter as load

    return load(directory, base, base_model)


def _bucket(length: int, cap: int) -> int:
    """The padded source length: the next power of two >= length (at least 8), at most `cap`."""
    return min(cap, max(8, 1 << max(length - 1, 0).bit_length()))


def plan_batches(lengths, batch_size: int):
    """Row indices grouped into batches of similar source length (sorted), so padding and shapes stay few."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def encode_batch(token_ids, rows, batch_size: int, max_len: int, pad_id: int):
    """(input_ids, attention_mask) (batch_size, bucket) for `rows` of token lists; missing rows are padding rows."""
    width = _bucket(max(len(token_ids[r]) for r in rows), max_len)
    ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for i, r in enumerate(rows):
        tokens = token_ids[r][:width]
        ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
    mask[len(rows):, 0] = 1  # padding rows: one visible token so attention is defined; their output is dropped
    return ids, mask


def source_limit(requested: int | None, max_positions: int) -> int:
    """The source length rows are truncated to: `requested`, at most (and by default) the model's positions; a
    request above them is said on stderr."""
    if requested is not None and requested < 1:
        raise ValueError(f"--max-source-length must be >= 1, got {requested}")
    if requested is not None and requested > max_positions:
        print(f"note: --max-source-length {requested} exceeds the model's max_position_embeddings ({max_positions}); "
              f"truncating inputs to {max_positions} tokens", file=sys.stderr)
    return min(requested or max_positions, max_positions)


def _say_skipped_and_truncated(texts, lengths, limit: int) -> None:
    empty = [str(i + 1) for i, t in enumerate(texts) if not t.strip()]
    if empty:
        print(f"note: row{'s' if len(empty) > 1 else ''} {', '.join(empty)}: empty text, summary left empty",
              file=sys.stderr)
    cut = sum(n > limit for n in lengths)
    if cut:
        print(f"note: {cut} of {len(texts)} rows truncated to {limit} tokens (the model's limit or "
              "--max-source-length); the rest of those texts was not read", file=sys.stderr)


def summarize_rows(server, tokenizer, rows, args, progress=None) -> tuple[list[str], int]:
    """Summaries of `rows` in input order (a list of num_return_sequences strings per row when the settings ask
    for more than one), and the number of generated tokens. A row whose text is empty (or only whitespace) gets ""
    (or []) without generating; texts are truncated to args.max_source_length tokens."""
    import jax

    texts = [row[args.text_column] for row in rows]
    full = tokenizer(texts)["input_ids"]
    _say_skipped_and_truncated(texts, [len(t) for t in full], args.max_source_length)
    token_ids = [t[: args.max_source_length - 1] + t[-1:] if len(t) > args.max_source_length else t for t in full]
    n = server.config.num_return_sequences  # outputs per row: rows i*n .. i*n+n-1 of each generate call
    summaries, generated = [""] * len(rows) if n == 1 else [[] for _ in rows], 0
    todo = [i for i, text in enumerate(texts) if text.strip()]
    for k, batch in enumerate(plan_batches([len(token_ids[i]) for i in todo], args.batch_size)):
        batch = [todo[i] for i in batch]
        ids, mask = encode_batch(token_ids, batch, args.batch_size, args.max_source_length, tokenizer.pad_token_id)
        names = [rows[r].get(args.adapter_column) for r in batch] + [None] * (args.batch_size - len(batch))
        # sampling: one key per batch, folded from --seed, so a re-run gives the same summaries
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), k) if server.config.do_sample else None
        out = server.generate(ids, mask, names, prng_key=key)[: len(batch) * n]
        generated += int(np.sum(out[:, 1:] != server.config.pad_token_id))
        decoded = [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
        for i, r in enumerate(batch):
            summaries[r] = decoded[i] if n == 1 else decoded[i * n:(i + 1) * n]
        if progress is not None:
            progress.update(len(batch))
    return summaries, generated


def _build_server(args, specs):
    import lora_jax
    from lora_jax.generation.serving import AdapterServer

    model, base = lora_jax.load_pretrained(args.base)
    loaded = {name: load_any_adapter(directory, base, args.base) for name, directory in specs.items()}
    overrides = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size",
                                                "min_length", "num_return_sequences") if getattr(args, k) is not None}
    # generation settings: the base checkpoint's (load_pretrained keeps them with the model), flags on top
    server = AdapterServer(model, base, adapters={n: a for n, (a, _) in loaded.items()},
                           configs={n: c for n, (_, c) in loaded.items()}, slots=max(len(loaded), 1),
                           method=args.method, **overrides)
    return server, lora_jax.load_tokenizer(args.base), model.config.max_position_embeddings


def _open_lines(path: str):
    if path == "-":
        return sys.stdin.readlines()
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    with open(path) as f:
        return f.readlines()


def _prepare_output(path: str) -> None:
    """Creates --output's directory up front, so a bad path fails before any generation work."""
    if path == "-":
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OSError(f"--output {path}: cannot create its directory ({e.strerror}: {e.filename})") from None
    if os.path.isdir(path) or not os.access(directory, os.W_OK):
        raise OSError(f"--output {path}: not a writable file path (a directory, or {directory} is not writable)")


def main(argv=None) -> int:
    args = _parse_args(argv)
    from tqdm import tqdm

    try:
        specs = parse_adapter_specs(args.adapter)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        rows = read_rows(_open_lines(args.input), args.text_column, args.adapter_column, specs, args.input == "-")
        if not rows:
            raise ValueError(f"{'stdin' if args.input == '-' else '--input ' + args.input} holds no rows to summarize")
        _prepare_output(args.output)
        server, tokenizer, max_positions = _build_server(args, specs)
        args.max_source_length = source_limit(args.max_source_length, max_positions)
        start = time.perf_counter()
        with tqdm(total=len(rows), desc="summarize", disable=args.no_progress, file=sys.stderr) as bar:
            summaries, generated = summarize_rows(server, tokenizer, rows, args, bar)
        seconds = time.perf_counter() - start
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"summarize failed: {e}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps({**row, args.summary_column: summary}) + "\n" for row, summary in zip(rows, summaries))
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        from lora_jax.checkpoints.files import atomic_write

        atomic_write(args.output, lines)
    print(json.dumps({"rows": len(rows), "adapters": sorted(specs), "generated_tokens": generated,
                      "seconds": round(seconds, 2), "compilations": server.num_compilations()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
