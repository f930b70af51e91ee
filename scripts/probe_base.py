"""Does a base model read its input? Two measurements on held-out text, printed as JSON.

- copy ROUGE-L: greedy generation with a clean (un-noised) text as the source, scored against that text. A denoising
  model that reads its encoder reproduces it; one that ignores its encoder writes something else.
- loss ratio right / shuffled: the mean token loss of reconstructing each text from its own source, divided by the
  loss with the sources shuffled across rows. 1.0 means the encoder is ignored; lower is better.

Held-out text: the pre-training corpus's validation split (never trained on) and the demo task's validation sources
(another domain: Python docstrings).

    python -m scripts.probe_base data/demo_base [--n 64] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json

import lora_jax
from lora_jax.data.batching import eval_batches
from lora_jax.generation import generate
from train.rouge import rouge

HELD_OUT = {"pretrain_validation": ("data/pretrain/validation.jsonl", "text"),
            "demo_validation_sources": ("data/demo/validation.jsonl", "source")}


def probe(model, params, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 32) -> dict:
    """{'copy_rouge_l', 'loss_right', 'loss_shuffled', 'loss_ratio'} of `model` on `texts`."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    cfg = model.config

    def batches(sources):
        rows = [{"input_ids": s, "labels": t} for s, t in zip(sources, ids)]
        return (b for b, _ in eval_batches(rows, batch_size, max_length, max_length, pad_id=cfg.pad_token_id,
                                           decoder_start_id=cfg.decoder_start_token_id))

    eval_step = lora_jax.make_eval_step(model)
    losses = {}
    for name, sources in (("right", ids), ("shuffled", ids[1:] + ids[:1])):
        outs = [eval_step(params, batch) for batch in batches(sources)]
        losses[name] = sum(float(o["loss_sum"]) for o in outs) / sum(float(o["tokens"]) for o in outs)
    predictions = []
    for batch in batches(ids):
        out = generate(model, params, batch["input_ids"], batch["attention_mask"], num_beams=1, max_new_tokens=max_length,
                       no_repeat_ngram_size=0)
        texts_out = tokenizer.batch_decode(out[batch["example_mask"].astype(bool)], skip_special_tokens=True)
        predictions += [t.strip() for t in texts_out]
    references = tokenizer.batch_decode(ids, skip_special_tokens=True)  # the text as truncated to max_length
    return {"copy_rouge_l": rouge(predictions, references)["rougeL"], "loss_right": losses["right"],
            "loss_shuffled": losses["shuffled"], "loss_ratio": losses["right"] / losses["shuffled"],
            "example": {"source": references[0], "copy": predictions[0]}}


def _texts(path: str, column: str, n: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)[column] for line, _ in zip(f, range(n))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--n", type=int, default=64, help="held-out texts per set")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args(argv)
    model, params = lora_jax.load_pretrained(args.model_dir)
    tokenizer = lora_jax.load_tokenizer(args.model_dir)
    report = {"model": args.model_dir}
    for name, (path, column) in HELD_OUT.items():
        report[name] = probe(model, params, tokenizer, _texts(path, column, args.n), args.max_length)
        report[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in report[name].items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
