"""Every python block of README.md runs, in order, in one namespace (later blocks use earlier blocks' names).

The blocks use the fixture checkpoint `tests/fixtures/tiny-bart/model` (their comments say where a hub id such as
facebook/bart-base would go), so they run offline. They run in a subprocess with 8 simulated CPU devices, which the
sharding block's (data=2, fsdp=4) mesh needs, from a temporary directory (the adapter block writes `my_adapter`).
A block can opt out with a line `<!-- readme-test: skip (why) -->` right before it; the test lists those."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = "<!-- readme-test: skip"

RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "readme"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md block at line {line}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"README.md block at line {line} failed")
print("ran", len(blocks), "blocks")
"""


def readme_blocks() -> tuple[list[tuple[int, str]], list[int]]:
    """([(line, code)] of the python blocks to run, [lines of the blocks marked skip])."""
    text = open(os.path.join(ROOT, "README.md")).read()
    run, skipped = [], []
    for m in re.finditer(r"```python\n(.*?)^```", text, re.M | re.S):
        line = text[: m.start()].count("\n") + 1
        previous = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if previous.startswith(SKIP):
            skipped.append(line)
        else:
            run.append((line, m.group(1)))
    return run, skipped


def test_readme_python_blocks_run(tmp_path):
    blocks, skipped = readme_blocks()
    assert len(blocks) >= 5, "README.md lost its python examples"
    fixtures = os.path.join(ROOT, "tests", "fixtures") + os.sep
    blocks = [(line, code.replace("tests/fixtures/", fixtures)) for line, code in blocks]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "runner.py", "blocks.json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"ran {len(blocks)} blocks" in out.stdout
    assert not skipped, f"README blocks marked skip (lines {skipped}): run them or say why in the README"
