"""Kernel selection: once per device type, reported, forced to the reference by switch, never
silently swapped; and whole quantized models give identical outputs either way."""
from __future__ import annotations

import logging

import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import apply_modes
from nemo_quant.quantization import kernel_dispatch as kd
from nemo_quant.quantization.calibrate import calibrate
from nemo_quant.quantization.config import QuantConfig, QuantizerSpec
from nemo_quant.quantization.validate import validate_quant_config
from nemo_quant.quantization.fake_quant import abs_max, fake_quant, reference_fake_quant
from tests.kernel_cases import spec_of
from tests.quant_helpers import W4A8_KV, logits, loop_over, tokens


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv(kd.ENV_VAR, raising=False)
    monkeypatch.setenv("NEMO_QUANT_QUIET", "0")
    kd.set_kernel_policy(None)
    yield
    kd.set_kernel_policy(None)


def _broken_builder(monkeypatch):
    def build():
        raise OSError("g++: command not found")

    monkeypatch.setitem(kd.BUILDERS, "cpu", (build, "needs g++ and ninja"))


def test_cpu_selects_the_cxx_kernels_once_and_says_so(capsys):
    backend = kd.backend_for(torch.device("cpu"))
    assert backend is not None and backend.name == "cpu"
    assert kd.backend_for(torch.device("cpu")) is backend
    out = capsys.readouterr().out
    assert out.count("fake quantization on cpu: C++ kernels") == 1


def test_environment_forces_the_reference(monkeypatch, capsys):
    monkeypatch.setenv(kd.ENV_VAR, "reference")
    kd.set_kernel_policy(None)
    assert kd.backend_for(torch.device("cpu")) is None
    assert "pure-torch reference" in capsys.readouterr().out


def test_config_key_overrides_environment_and_is_validated(monkeypatch, tiny_model):
    monkeypatch.setenv(kd.ENV_VAR, "auto")
    kd.set_kernel_policy(None)
    apply_modes(tiny_model, [("quantize", {**W4A8_KV, "kernels": "reference"})])
    assert kd.backend_for(torch.device("cpu")) is None
    with pytest.raises(ConfigError, match=r"quant\.kernels='fast': choose one of auto, reference, kernels"):
        validate_quant_config(QuantConfig(weight=QuantizerSpec(), kernels="fast"))
    monkeypatch.setenv(kd.ENV_VAR, "gpu")
    kd.set_kernel_policy(None)
    with pytest.raises(ConfigError, match="NEMO_QUANT_KERNELS='gpu'"):
        kd.backend_for(torch.device("cpu"))


def test_build_failure_warns_once_under_auto(monkeypatch, caplog):
    _broken_builder(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert kd.backend_for(torch.device("cpu")) is None
        assert kd.backend_for(torch.device("cpu")) is None
    messages = [r.getMessage() for r in caplog.records if "kernels unavailable" in r.getMessage()]
    assert len(messages) == 1 and "g++: command not found" in messages[0] and "NEMO_QUANT_KERNELS=reference" in messages[0]


def test_build_failure_is_an_error_when_kernels_are_required(monkeypatch):
    _broken_builder(monkeypatch)
    kd.set_kernel_policy("kernels")
    with pytest.raises(kd.KernelUnavailableError, match="g\\+\\+: command not found.*NEMO_QUANT_KERNELS=auto"):
        kd.backend_for(torch.device("cpu"))


def test_layout_without_kernel_is_reported_once(caplog):
    spec = spec_of(("int8", "channel", 0))
    x = torch.randn(2, 3, 8)
    amax = torch.rand(2, 1, 1) + 0.5  # broadcasts over two dims: no kernel layout
    kd._reported.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(fake_quant(x, spec, amax), reference_fake_quant(x, spec, amax))
    assert sum("no kernel for int8" in r.getMessage() for r in caplog.records) == 1


def test_abs_max_matches_torch():
    x = torch.randn(5, 70, dtype=torch.bfloat16)
    assert abs_max(x).dtype == torch.bfloat16 and abs_max(x) == x.abs().amax()
    assert torch.equal(abs_max(x, 70), x.abs().amax(dim=1, keepdim=True))
    assert abs_max(x, 16).shape == (5, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_identical_with_kernels_and_reference(megatron_tp1, dtype):
    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    def run(policy):
        kd.set_kernel_policy(policy)
        torch.manual_seed(0)
        model = build_gpt_model(TINY, dtype)
        apply_modes(model, [("quantize", W4A8_KV)])
        calibrate(model, loop_over(tokens(1), tokens(2)))
        amax = [b.clone() for n, b in model.named_buffers() if n.endswith("_amax")]
        return logits(model, tokens(3)), amax

    (out_k, amax_k), (out_r, amax_r) = run("kernels"), run("reference")
    assert all(torch.equal(a, b) for a, b in zip(amax_k, amax_r, strict=True))
    assert torch.equal(out_k, out_r)

