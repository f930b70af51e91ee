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


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.learning_rat=1e-3"], r"unknown config key 'optim.learning_rat'; did you mean 'optim.learning_rate'"),
        (["trian.batch_size=2"], r"unknown config key 'trian'; did you mean 'train'"),
        (["train.batch_size=two"], r"'train.batch_size' must be int, got 'two'"),
        (["lora.rank=0"], r"rank must be an integer >= 1"),
        (["lora.mode=half"], r"'lora.mode' must be one of 'lora', 'full'"),
        (["data.padding=dynamic"], r"'data.padding' must be one of 'bucket', 'fixed'"),
        (["data.eval_files=nope/*.jsonl"], r"'data.eval_files': no file matches"),
        (["train.batch_size=6", "optim.grad_accum_steps=4"], r"divisible by optim.grad_accum_steps"),
        (["model.checkpoint=null"], r"model.init_config"),
        (["lora.dropout=1.5"], r"dropout must be in \[0, 1\)"),
        (["data.mask_ratio=1.5"], r"'data.mask_ratio' must be in \[0, 1\], got 1.5"),
        (["data.clean_fraction=-0.1"], r"'data.clean_fraction' must be in \[0, 1\], got -0.1"),
        (["data.join_rows=0"], r"'data.join_rows' must be >= 1, got 0"),
        (["model.remat=dot"], r"'model.remat' must be null or one of \['dots', 'dots_no_batch', 'full'\], got 'dot'"),
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


def test_lora_variants_are_reachable_from_the_run_config(cfg_file):
    cfg = load_config(cfg_file(), ["lora.use_dora=true"])
    assert to_lora_config(cfg).use_dora
    assert to_lora_config(load_config(cfg_file(), ["lora.init=pissa_niter_4"])).residual_init
    with pytest.raises(ConfigError, match="lora: .*use_dora with init='olora' is not supported"):
        load_config(cfg_file(), ["lora.use_dora=true", "lora.init=olora"])
    with pytest.raises(ConfigError, match="lora: LoraConfig.init must be one of"):
        load_config(cfg_file(), ["lora.init=svd"])
