"""Trains data/demo_tokenizer/: a byte-level BPE tokenizer (vocab 4096) in BART's format for the demo model.

Trained with the `tokenizers` library on the two offline corpora made by scripts/make_pretrain_corpus.py (Debian
package descriptions) and scripts/make_demo_data.py (Python standard-library docstrings, train split only).
The shipped tokenizer was trained on the first version of the demo data (whole docstring -> summary line), whose train
split took other modules than today's: some of today's validation/test docstrings were in its BPE training text (merge
statistics only; no model saw them). Re-running this script on today's files gives a tokenizer for a new base.
Special tokens as in BART: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4; `transformers.AutoTokenizer` loads the directory.

    python -m scripts.train_tokenizer [--out data/demo_tokenizer]
"""

import argparse
import json
import os

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def texts():
    for path, keys in (("data/pretrain/train.jsonl", ("text",)), ("data/demo/train.jsonl", ("source", "target"))):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                for k in keys:
                    yield row[k]


def _token(content: str, lstrip: bool = False) -> dict:
    return {"content": content, "lstrip": lstrip, "normalized": True, "rstrip": False, "single_word": False}


def main():
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo_tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts(), vocab_size=args.vocab_size, min_frequency=2, special_tokens=SPECIAL)
    assert [bpe.token_to_id(t) for t in SPECIAL] == [0, 1, 2, 3, 4]
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    os.makedirs(args.out, exist_ok=True)
    bpe.save_model(args.out)  # vocab.json + merges.txt (what BartTokenizer reads)
    bpe.save(os.path.join(args.out, "tokenizer.json"))
    names = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "pad_token": "<pad>",
             "unk_token": "<unk>", "mask_token": "<mask>"}
    special_map = {k: _token(v, lstrip=v == "<mask>") for k, v in names.items()}
    config = {
        "tokenizer_class": "BartTokenizer", "add_prefix_space": False, "errors": "replace", "trim_offsets": True,
        "clean_up_tokenization_spaces": False, "model_max_length": 256, **names,
        "added_tokens_decoder": {str(i): {**_token(t, lstrip=t == "<mask>"), "special": True} for i, t in enumerate(SPECIAL)},
    }
    for name, content in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(content, f, indent=2)
    print(json.dumps({"vocab": bpe.get_vocab_size(), "out": args.out}))


if __name__ == "__main__":
    main()
