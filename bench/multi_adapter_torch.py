"""The PEFT row of `bench.multi_adapter`: PEFT's mixed-batch `generate(adapter_names=...)`, in its own process (no
JAX imported). Reads the spec JSON the parent wrote (base dir, PEFT adapter dirs, token ids, row adapter names,
beam settings) and prints one JSON line: tokens/s (median of the timed calls after one warm-up) and peak RSS.
Needs torch, peft and transformers 4.x (PEFT 0.21's seq2seq model does not run on transformers 5)."""

import json
import statistics
import sys
import time


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak RSS since its exec (ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main(spec_path: str) -> int:
    import peft
    import torch
    from transformers import BartForConditionalGeneration

    spec = json.load(open(spec_path))
    names = list(spec["adapters"])
    model = BartForConditionalGeneration.from_pretrained(spec["base"])
    model = peft.PeftModel.from_pretrained(model, spec["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(spec["adapters"][name], adapter_name=name)
    model.eval()
    input_ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
    new = spec["max_new_tokens"]
    settings = dict(num_beams=spec["num_beams"], max_new_tokens=new, min_length=new + 1, length_penalty=1.0,
                    no_repeat_ngram_size=0, early_stopping=False, forced_bos_token_id=None, forced_eos_token_id=None)
    times = []
    with torch.no_grad():
        for i in range(spec["repeats"] + 1):  # the first call warms up (allocations, kernels)
            t0 = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=spec["names"], **settings)
            if i:
                times.append(time.perf_counter() - t0)
    tokens = len(spec["names"]) * new
    print(json.dumps({"peft_tok_s": tokens / statistics.median(times), "peft_torch_threads": torch.get_num_threads(),
                      "peft_peak_rss_bytes": peak_rss_bytes(),
                      "peft_versions": f"torch {torch.__version__}, peft {peft.__version__}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
