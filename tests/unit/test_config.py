"""Bad configs fail at config time with the key's path, before any model is loaded."""
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from nemo_quant.config.schema import register_configs
from nemo_quant.config.validate import ConfigError, validate

register_configs()


def _compose(*overrides):
    with initialize_config_module(config_module="nemo_quant.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid():
    cfg = _compose()
    validate(cfg)
    assert cfg.model.path is None and cfg.data.seq_length == 512 and cfg.parallel.tp == 1


def test_group_options_compose():
    cfg = _compose("parallel=tp3", "data=files", "data.eval_files=[a.txt]")
    assert cfg.parallel.tp == 3 and cfg.data.name == "files"


@pytest.mark.parametrize("override,fragment", [
    ("data.seq_lenght=128", "seq_lenght"),
    ("parallel.tensor_parallel=2", "tensor_parallel"),
])
def test_unknown_key_names_the_path(override, fragment):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert fragment in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("data.seq_length=long", "data.seq_length"),
    ("model.dtype=float8", "model.dtype"),
    ("data.name=wikipedia", "data.name"),
])
def test_bad_value_names_the_path(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    cause = info.value.__cause__
    assert isinstance(cause, (ValidationError, ConfigKeyError))
    assert key in f"{cause.full_key}"


@pytest.mark.parametrize("override,message", [
    ("parallel.tp=0", "parallel.tp=0"),
    ("data.seq_length=1", "data.seq_length=1"),
    ("model.path=/nonexistent/model.gguf", "model.path=/nonexistent"),
    ("data=files", "data.eval_files"),
])
def test_semantic_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(_compose(override))


def test_bad_preset_name_lists_the_options():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("quant=int5_awq")
    message = str(info.value)
    assert "quant" in message and "int4_awq" in message and "nvfp4" in message


def test_presets_compose_and_validate():
    from omegaconf import OmegaConf

    from nemo_quant.quantization.validate import validate_quant_config

    for name in ["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "mxfp8", "int8_weight_only", "int4_weight_only"]:
        cfg = _compose(f"quant={name}", "+quant/kv_cache=fp8", "command=ptq")
        validate(cfg)
        typed = OmegaConf.to_object(cfg.quant)
        validate_quant_config(typed)
        assert typed.name == name and typed.kv_cache.format == "fp8_e4m3"


def test_ptq_without_preset_is_rejected():
    with pytest.raises(ConfigError, match="quant=<preset>"):
        validate(_compose("command=ptq"))


def test_bad_quant_value_names_the_path():
    with pytest.raises(ConfigCompositionException) as info:
        _compose("quant=fp8", "quant.weight.format=fp7")
    assert "quant.weight.format" in str(info.value.__cause__.full_key)


@pytest.mark.parametrize("overrides,message", [
    (["command=train", "checkpoint.save=/tmp/x", "qlora=nf4", "quant=int4_awq"], "would both quantize the same weights"),
    (["command=train", "checkpoint.save=/tmp/x", "qlora=nf4", "sparsity=admm"], "sparsity and qlora in one job"),
    (["command=eval", "qlora=nf4"], r"`nemo-quant eval` takes the trained model with checkpoint\.load"),
    (["command=train", "checkpoint.save=/tmp/x", "qlora=lora", "qlora.rank=0"], r"qlora\.rank=0"),
])
def test_qlora_config_refusals_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(_compose(*overrides))
    for preset in ("nf4", "nf4_loftq", "lora"):  # the presets themselves are valid
        validate(_compose("command=train", "checkpoint.save=/tmp/x", f"qlora={preset}"))
