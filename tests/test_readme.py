"""Every python block of README.md and of each docs/*.md guide runs, so no example rots; the README stays short and
every relative link in them points at a file that exists.

Each file's blocks run in order in one namespace of their own (a later block uses an earlier block's names; a guide
never depends on another guide). The blocks use the fixture checkpoint `tests/fixtures/tiny-bart/model` (their
comments say where a hub id such as facebook/bart-base would go), so they run offline; "configs/..." and "data/..."
paths point at the repository's. All files run in one subprocess (JAX is imported once) with 8 simulated CPU
devices, which the scaling guide's (data=2, fsdp=4) mesh needs, each file from a fresh temporary directory of its own
(blocks write adapters and run directories there). A block can opt out with a line
`<!-- readme-test: skip (why) -->` right before it; the test lists those."""

import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = "<!-- readme-test: skip"
MAX_README_LINES = 150

RUNNER = """
import json, os, sys, traceback
files = json.load(open(sys.argv[1]))
for name, blocks in files:
    os.makedirs(os.path.join(sys.argv[2], name.replace("/", "_")))
    os.chdir(os.path.join(sys.argv[2], name.replace("/", "_")))
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        try:
            exec(compile(code, f"{name} block at line {line}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"{name} block at line {line} failed")
    print("ran", name, len(blocks), "blocks", flush=True)
"""


def doc_files() -> list[str]:
    """README.md and docs/*.md, relative to the repository root."""
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks(name: str) -> tuple[list[tuple[int, str]], list[int]]:
    """([(line, code)] of the python blocks of file `name` to run, [lines of the blocks marked skip])."""
    text = open(os.path.join(ROOT, name)).read()
    run, skipped = [], []
    for m in re.finditer(r"```python\n(.*?)^```", text, re.M | re.S):
        line = text[: m.start()].count("\n") + 1
        previous = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if previous.startswith(SKIP):
            skipped.append(line)
        else:
            run.append((line, m.group(1)))
    return run, skipped


def local_paths(code: str, fixtures: str, configs: str, data: str) -> str:
    """The block with the repository's relative paths made absolute (the blocks run from a temporary directory)."""
    return code.replace("tests/fixtures/", fixtures).replace('"configs/', '"' + configs).replace('"data/', '"' + data)


def test_every_python_block_runs(tmp_path):
    fixtures = os.path.join(ROOT, "tests", "fixtures") + os.sep
    configs, data = os.path.join(ROOT, "configs") + os.sep, os.path.join(ROOT, "data") + os.sep
    files, skipped = [], []
    for name in doc_files():
        blocks, skips = python_blocks(name)
        skipped += [f"{name}:{line}" for line in skips]
        if blocks:
            files.append((name, [(line, local_paths(code, fixtures, configs, data)) for line, code in blocks]))
    assert len(files) >= 8, f"README.md and docs/ lost their python examples: {[n for n, _ in files]}"
    (tmp_path / "blocks.json").write_text(json.dumps(files))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "runner.py", "blocks.json", str(tmp_path / "cwd")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    for name, blocks in files:
        assert f"ran {name} {len(blocks)} blocks" in out.stdout
    assert not skipped, f"blocks marked skip ({skipped}): run them or say why in the file"


def test_every_guide_has_a_runnable_example():
    bare = [name for name in doc_files() if not python_blocks(name)[0]]
    assert not bare, f"{bare} hold no python block: each guide shows its topic in code the suite runs"


def test_readme_is_short():
    lines = open(os.path.join(ROOT, "README.md")).read().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move the detail into a guide under docs/"


def test_relative_links_resolve():
    broken = []
    for name in doc_files() + ["CONTRIBUTING.md", "CHANGELOG.md"]:
        text = open(os.path.join(ROOT, name)).read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target) and not os.path.exists(
                    os.path.join(ROOT, os.path.dirname(name), target)):
                broken.append(f"{name}: {target}")
    assert not broken, broken
