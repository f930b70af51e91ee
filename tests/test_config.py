"""Run-config loading: overrides, and errors that name the key before anything heavy runs."""

import pytest

from train.config import ConfigError, load_config, parse_override, to_lora_config

BASE = """
model: {checkpoint: tests/fixtures/tiny-bart/model}
data: {train_files: tests/fixtures/tiny-bart/reference_texts.json}
"""


@pytest.fixture
def cfg_file(tmp_path):
    def write(extra=""):
        path = tmp_path / "c.yaml"
        path.write_text(BASE + extra)
        return str(path)

    return write


def test_defaults_and_overrides(cfg_file):
    cfg = load_config(cfg_file("optim: {learning_rate: 3e-4}\n"), ["lora.targets=[q_proj,k_proj]", "train.num_steps=7", "lora.alpha=32"])
    assert cfg.optim.learning_rate == pytest.approx(3e-4) and isinstance(cfg.optim.learning_rate, float)
    assert cfg.train.num_steps == 7 and cfg.lora.alpha == 32.0
    assert to_lora_config(cfg).targets == ("q_proj", "k_proj")
    assert to_lora_config(load_config(cfg_file(), ["lora.mode=full"])) is None
    cfg = load_config(cfg_file(), ["model.scan_layers=false", "model.attention=explicit", "train.compile_cache_dir=null"])
    assert (cfg.model.scan_layers, cfg.model.attention, cfg.train.compile_cache_dir) == (False, "explicit", None)
    assert load_config(cfg_file()).model.scan_layers is True


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.learning_rat=1e-3"], r"unknown config key 'optim.learning_rat'; did you mean 'optim.learning_rate'"),
        (["trian.batch_size=2"], r"unknown config key 'trian'; did you mean 'train'"),
        (["train.batch_size=two"], r"'train.batch_size' must be int, got 'two'"),
        (["lora.rank=0"], r"config key 'lora.rank' must be >= 1, got 0"),
        (["lora.mode=half"], r"'lora.mode' must be one of 'lora', 'full'"),
        (["data.padding=dynamic"], r"'data.padding' must be one of 'bucket', 'fixed'"),
        (["data.eval_files=nope/*.jsonl"], r"'data.eval_files': no file matches"),
        (["train.batch_size=6", "optim.grad_accum_steps=4"], r"divisible by optim.grad_accum_steps"),
        (["model.checkpoint=null"], r"model.init_config"),
        (["lora.dropout=1.5"], r"'lora.dropout' must be in \[0, 1\), got 1.5"),
        (["data.mask_ratio=1.5"], r"'data.mask_ratio' must be in \[0, 1\], got 1.5"),
        (["data.clean_fraction=-0.1"], r"'data.clean_fraction' must be in \[0, 1\], got -0.1"),
        (["data.join_rows=0"], r"'data.join_rows' must be >= 1, got 0"),
        (["model.remat=dot"], r"'model.remat' must be null or one of \['dots', 'dots_no_batch', 'full'\], got 'dot'"),
        (["model.attention=flash"], r"'model.attention' must be one of \[None, 'xla', 'cudnn', 'explicit'\], got 'flash'"),
    ],
)
def test_bad_configs_name_the_key(cfg_file, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg_file(), overrides)


def test_missing_config_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("lora.rank")


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/demo_pretrain.yaml", "configs/bart_base_pubmed.yaml"])
def test_shipped_configs_parse(path):
    import os

    import yaml

    from train.config import RunConfig, parse_section

    with open(path) as f:
        parse_section(RunConfig, yaml.safe_load(f), "")  # types and keys; files may need the network or a demo base
    assert os.path.exists(path)


# Every numeric key with a value outside its range: the message names the key and the range.
RANGE_CASES = [
    ("train.save_every=0", "'train.save_every' must be >= 1, got 0"),
    ("train.eval_every=0", "'train.eval_every' must be >= 1, got 0"),
    ("train.log_every=0", "'train.log_every' must be >= 1, got 0"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be >= 1, got 0"),
    ("train.max_nonfinite_steps=0", "'train.max_nonfinite_steps' must be >= 1, got 0"),
    ("train.divergence_factor=1", "'train.divergence_factor' must be > 1, got 1"),
    ("train.seed=-1", "'train.seed' must be in [0, 4294967296), got -1"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
    ("train.num_steps=-5", "'train.num_steps' must be >= 1, got -5"),
    ("lora.alpha=0", "'lora.alpha' must be > 0, got 0"),
    ("lora.alpha=-16", "'lora.alpha' must be > 0, got -16"),
    ("lora.dropout=-0.1", "'lora.dropout' must be in [0, 1), got -0.1"),
    ("lora.loraplus_lr_ratio=-1", "'lora.loraplus_lr_ratio' must be > 0, got -1"),
    ("optim.learning_rate=0", "'optim.learning_rate' must be > 0, got 0"),
    ("optim.learning_rate=-1", "'optim.learning_rate' must be > 0, got -1"),
    ("optim.learning_rate=.inf", "'optim.learning_rate' must be a finite number, got inf"),
    ("optim.learning_rate=.nan", "'optim.learning_rate' must be a finite number, got nan"),
    ("optim.learning_rate=1e400", "'optim.learning_rate' must be a finite number, got inf"),
    ("optim.warmup_steps=-1", "'optim.warmup_steps' must be >= 0, got -1"),
    ("optim.weight_decay=-0.01", "'optim.weight_decay' must be >= 0, got -0.01"),
    ("optim.max_grad_norm=0", "'optim.max_grad_norm' must be > 0, got 0"),
    ("optim.b1=1", "'optim.b1' must be in [0, 1), got 1"),
    ("optim.b2=-0.5", "'optim.b2' must be in [0, 1), got -0.5"),
    ("optim.eps=0", "'optim.eps' must be > 0, got 0"),
    ("optim.label_smoothing=1", "'optim.label_smoothing' must be in [0, 1), got 1"),
    ("data.max_eval_examples=0", "'data.max_eval_examples' must be >= 1, got 0"),
    ("data.num_proc=0", "'data.num_proc' must be >= 1, got 0"),
    ("data.max_source_length=0", "'data.max_source_length' must be >= 1, got 0"),
    ("eval.max_examples=0", "'eval.max_examples' must be >= 1, got 0"),
    ("eval.num_samples=-1", "'eval.num_samples' must be >= 0, got -1"),
    ("eval.length_penalty=.inf", "'eval.length_penalty' must be a finite number, got inf"),
    ("eval.no_repeat_ngram_size=-1", "'eval.no_repeat_ngram_size' must be >= 0, got -1"),
    ("eval.num_beams=0", "'eval.num_beams' must be >= 1, got 0"),
    ("mesh.fsdp=0", "'mesh.fsdp' must be -1 (all remaining devices) or >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_numbers_outside_their_range_name_the_key_and_the_range(cfg_file, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file(), [override])
    assert str(e.value) == "config key " + message


def _numeric_keys():
    """(dotted key, type with its declared range) of every int / float field of every section."""
    import dataclasses
    import typing

    from lora_jax.ranges import split_annotated
    from train.config import RunConfig

    out = []
    sections = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        for name, hint in typing.get_type_hints(sections[section.name], include_extras=True).items():
            base = split_annotated(hint)[0]
            if {int, float} & ({base} | set(typing.get_args(base))):
                out.append((f"{section.name}.{name}", hint))
    return out


def test_every_numeric_key_declares_a_range():
    from lora_jax.ranges import split_annotated

    keys = dict(_numeric_keys())
    assert len(keys) >= 38  # all sections' numbers are found
    undeclared = [k for k, hint in keys.items() if not split_annotated(hint)[1]]
    assert undeclared == ["eval.length_penalty"]  # any finite value: a negative penalty favours short beams


@pytest.mark.parametrize("key", [k for k, h in _numeric_keys() if "float" in str(h)])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_refuses_inf_and_nan(cfg_file, key, value):
    with pytest.raises(ConfigError, match=rf"config key '{key}' must be a finite number, got (-?inf|nan)"):
        load_config(cfg_file(), [f"{key}={value}"])


def test_defaults_and_boundaries_are_accepted(cfg_file):
    cfg = load_config(cfg_file(), ["optim.warmup_steps=5000", "optim.weight_decay=0", "optim.b1=0", "optim.max_grad_norm=null",
                                   "lora.loraplus_lr_ratio=null", "train.divergence_factor=null", "train.seed=4294967295",
                                   "eval.length_penalty=-2.0", "eval.num_samples=0", "data.mask_ratio=1", "mesh.data=-1"])
    assert cfg.optim.warmup_steps == 5000 and cfg.optim.max_grad_norm is None and cfg.eval.length_penalty == -2.0


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: __import__("lora_jax").LoraConfig(alpha=0), "LoraConfig.alpha must be > 0, got 0"),
        (lambda: __import__("lora_jax").LoraConfig(rank=0), "LoraConfig.rank must be >= 1, got 0"),
        (lambda: __import__("lora_jax").LoraConfig(rank=2.5), "LoraConfig.rank must be an integer, got 2.5 (float)"),
        (lambda: __import__("lora_jax").LoraConfig(dropout=float("nan")), "LoraConfig.dropout must be a finite number, got nan"),
        (lambda: __import__("lora_jax").LoraConfig(alpha_pattern={"q_proj": -1.0}),
         "LoraConfig.alpha_pattern['q_proj'] must be > 0, got -1.0"),
        (lambda: __import__("lora_jax").GenerationConfig(num_beams=0), "GenerationConfig.num_beams must be >= 1, got 0"),
        (lambda: __import__("lora_jax").GenerationConfig(length_penalty=float("inf")),
         "GenerationConfig.length_penalty must be a finite number, got inf"),
        (lambda: __import__("lora_jax").GenerationConfig(no_repeat_ngram_size=-1),
         "GenerationConfig.no_repeat_ngram_size must be >= 0, got -1"),
        (lambda: __import__("lora_jax").GenerationConfig().replace(max_new_tokens=0),
         "GenerationConfig.max_new_tokens must be >= 1, got 0"),
        (lambda: __import__("lora_jax.sharding").sharding.MeshConfig(data=0),
         "MeshConfig.data must be -1 (all remaining devices) or >= 1, got 0"),
    ],
)
def test_library_configs_refuse_the_same_values_in_python(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


@pytest.mark.parametrize(
    "content,message",
    [
        (b"- model\n- data\n", r"must hold a mapping of sections \(model:, data:, ...\), got a list"),
        (b"just a string\n", r"must hold a mapping of sections \(model:, data:, ...\), got a str"),
        (b"model:\n  checkpoint: x\n bad: [\n", r"is not valid YAML: line 3, column 2: "),
        (b"model: {checkpoint: [x}\n", r"is not valid YAML: line 1, column 23: "),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"is not UTF-8 text \(byte 0x89 at offset 0\)"),
        (b"model: {checkpoint: x}\n\x00\x01\x02", r"is not valid YAML: "),
        (b"model: 5\n", r"^model: expected a mapping of keys, got 5$"),
    ],
    ids=["list", "string", "bad-indent", "bad-bracket", "binary", "nul-bytes", "section-not-mapping"],
)
def test_unreadable_config_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(path))
    assert "\n" not in str(e.value)
    if "model:" not in message:
        assert str(path) in str(e.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"config file '{tmp_path}' is a directory; pass a YAML file"):
        load_config(str(tmp_path))


def test_lora_variants_are_reachable_from_the_run_config(cfg_file):
    cfg = load_config(cfg_file(), ["lora.use_dora=true"])
    assert to_lora_config(cfg).use_dora
    assert to_lora_config(load_config(cfg_file(), ["lora.init=pissa_niter_4"])).residual_init
    with pytest.raises(ConfigError, match="lora: .*use_dora with init='olora' is not supported"):
        load_config(cfg_file(), ["lora.use_dora=true", "lora.init=olora"])
    with pytest.raises(ConfigError, match="lora: LoraConfig.init must be one of"):
        load_config(cfg_file(), ["lora.init=svd"])
