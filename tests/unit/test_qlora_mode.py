"""The qlora mode on one process: the NF4 base layer against its reference, memory of the
backward, the adapters against PEFT + bitsandbytes, and every refusal before work."""
import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import ModeError, apply_modes
from nemo_quant.qlora.hf_parts import split_parts
from tests.qlora_helpers import perturb_adapters, reference_weight
from tests.quant_helpers import tokens


@pytest.fixture
def qtiny(megatron_tp1):
    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import QTINY

    torch.manual_seed(0)
    return build_gpt_model(QTINY)


def _full_reference(model, name: str, w_full: torch.Tensor) -> torch.Tensor:
    from nemo_quant.models.arch import arch_of_config
    from nemo_quant.qlora.hf_parts import join_parts

    arch = arch_of_config(model.config)
    parts = split_parts(w_full, name, arch, gated=name.endswith("linear_fc1"))
    return join_parts([reference_weight(p) for p in parts], name, arch)


@pytest.mark.parametrize("name", ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc1",
                                  "decoder.layers.1.mlp.linear_fc2"])
def test_forward_and_input_gradient_equal_dequantize_plus_linear(qtiny, name):
    w = qtiny.get_submodule(name).weight.detach().clone()
    apply_modes(qtiny, [("qlora", {"rank": 4})])
    perturb_adapters(qtiny)
    layer = qtiny.get_submodule(name)
    assert not hasattr(layer, "weight") or layer.weight.untyped_storage().nbytes() <= 4  # the fp weight is freed
    x = torch.randn(5, 2, w.shape[1], requires_grad=True)
    y, _ = layer(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)

    base = _full_reference(qtiny, name, w)
    xr = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    parts = a.shape[0] // 4
    row_part = _row_parts(qtiny, name, base.shape[0])
    delta_rows = torch.stack([b[i] @ a[row_part[i] * 4:(row_part[i] + 1) * 4] for i in range(base.shape[0])])
    yr = torch.nn.functional.linear(xr, base) + layer._nq_lora_scaling * torch.nn.functional.linear(xr, delta_rows)
    (gxr,) = torch.autograd.grad(yr, xr, g)
    assert parts == (3 if name.endswith("qkv") else 2 if name.endswith("fc1") else 1)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gxr, rtol=1e-5, atol=1e-5)
    # the base alone is bit-exact, forward and backward: adapters off
    with torch.no_grad():
        layer.lora_B.zero_()
    y0, _ = layer(x)
    (gx0,) = torch.autograd.grad(y0, x, g)
    assert torch.equal(y0, torch.nn.functional.linear(x, base))
    assert torch.equal(gx0, g.matmul(base))


def _row_parts(model, name, rows):
    from nemo_quant.models.arch import arch_of_config
    from nemo_quant.qlora.hf_parts import join_parts

    arch = arch_of_config(model.config)
    ids = torch.arange(rows).reshape(-1, 1).float()
    parts = split_parts(ids, name, arch, gated=name.endswith("linear_fc1"))
    part_of = join_parts([torch.full_like(p, i) for i, p in enumerate(parts)], name, arch)
    return part_of.reshape(-1).long().tolist()


def test_backward_keeps_no_weight_sized_tensor(qtiny):
    apply_modes(qtiny, [("qlora", {"rank": 4})])
    layer = qtiny.decoder.layers[0].mlp.linear_fc1
    weights = layer.nf4_weight.numel() * 2
    saved = []
    x = torch.randn(3, 1, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y, _ = layer(x)
    assert saved and max(saved) < weights / 8, f"a weight-sized tensor ({max(saved)} elements) is kept for backward"
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


def test_only_adapters_train_and_base_bits(qtiny):
    from nemo_quant.qlora.nf4_base import stored_bits
    from nemo_quant.qlora.modules import lora_layers

    apply_modes(qtiny, [("qlora", {})])
    trainable = [n for n, p in qtiny.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    bits = weights = 0
    for _, m in lora_layers(qtiny):
        b, w = stored_bits(m)
        bits, weights = bits + b, weights + w
    assert 4.125 < bits / weights < 4.14  # 4 + 8/64 + 32/16384 + one fp32 offset per tensor


def test_plain_lora_keeps_the_base_and_trains_only_adapters(qtiny):
    layer_w = qtiny.decoder.layers[0].self_attention.linear_proj.weight.detach().clone()
    apply_modes(qtiny, [("qlora", {"base_format": "none", "rank": 4})])
    perturb_adapters(qtiny)
    layer = qtiny.decoder.layers[0].self_attention.linear_proj
    assert torch.equal(layer.weight, layer_w) and not layer.weight.requires_grad
    x = torch.randn(2, 1, 128)
    want = torch.nn.functional.linear(x, layer_w) + layer._nq_lora_scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_loftq_init_absorbs_part_of_the_quantization_error(qtiny):
    name = "decoder.layers.1.mlp.linear_fc2"
    w = qtiny.get_submodule(name).weight.detach().clone()
    apply_modes(qtiny, [("qlora", {"init": "loftq", "rank": 16})])
    layer = qtiny.get_submodule(name)
    nf4 = reference_weight(w)
    effective = nf4 + layer._nq_lora_scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    # scaling * B A is the best rank-16 approximation of the NF4 error (Eckart-Young)
    s = torch.linalg.svdvals((w - nf4).double())
    torch.testing.assert_close((effective - w).double().norm(), s[16:].norm(), rtol=1e-4, atol=0)
    assert (effective - w).norm() < (nf4 - w).norm()


@pytest.mark.parametrize("cfg, match", [
    ({"targets": ["decoder.layers.*", "decoder.layers.9.*"]}, r"qlora\.targets\[1\]='decoder\.layers\.9\.\*' matches no"),
    ({"targets": ["output_layer"]}, r"output_layer.*not supported"),
    ({"rank": 200}, r"qlora\.rank=200 exceeds a dimension"),
    ({"rank": 0}, r"qlora\.rank=0"),
    ({"dropout": 1.0}, r"qlora\.dropout"),
    ({"init": "loftq", "base_format": "none"}, r"qlora\.init=loftq"),
])
def test_bad_configs_fail_before_work(qtiny, cfg, match):
    from nemo_quant.preflight import PreflightError, preflight

    with pytest.raises((ConfigError, PreflightError), match=match):
        preflight(qtiny, None, [("qlora", cfg)])
    assert not any(p.requires_grad is False for p in qtiny.parameters())  # nothing was changed


def test_input_dims_off_the_nf4_block_are_refused(tiny_model):
    """TINY's fc2 has 96 inputs: NF4 blocks of 64 would cross rows."""
    from nemo_quant.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match=r"linear_fc2: its input dim 96 is not a multiple of NF4's block of 64"):
        preflight(tiny_model, None, [("qlora", {})])
    preflight(tiny_model, None, [("qlora", {"base_format": "none"})])  # a plain LoRA has no blocks


def test_qlora_and_fake_quant_on_the_same_weight_are_refused(qtiny):
    from tests.quant_helpers import INT8_CHANNEL

    apply_modes(qtiny, [("qlora", {})])
    with pytest.raises(ModeError, match="'quantize' cannot be applied after 'qlora'"):
        apply_modes(qtiny, [("quantize", INT8_CHANNEL)])


def test_adapter_gradients_equal_peft_on_bitsandbytes(qtiny, tmp_path):
    """Same batch, same loss: our adapter gradients (fused q/k/v and gate/up split per Hugging
    Face module) equal PEFT's LoRA gradients on bitsandbytes' Linear4bit of our exported base."""
    pytest.importorskip("peft")
    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.models.arch import arch_of_megatron
    from nemo_quant.qlora.hf_export import convert_qlora_layer
    from nemo_quant.export.gather import stream_model
    from nemo_quant.runtime.pipeline import gather_vocab_logits, position_ids_for
    from tests.qlora_helpers import hf_qlora_model

    arch = arch_of_megatron(qtiny, 257)
    apply_modes(qtiny, [("qlora", {"rank": 4, "alpha": 8})])
    perturb_adapters(qtiny)
    export_checkpoint(qtiny, arch, ExportConfig(format="peft", path=str(tmp_path / "e"), dtype="float32"))
    batch = tokens(3, batch=2, length=17)
    qtiny.train()
    # the loss over the true vocabulary (the export drops Megatron's padded rows)
    out = gather_vocab_logits(qtiny(batch[:, :-1], position_ids_for(batch[:, :-1]), None), 257)
    ours = torch.nn.functional.cross_entropy(out.reshape(-1, 257).float(), batch[:, 1:].reshape(-1))
    ours.backward()
    grads = {}
    for kind, item in stream_model(qtiny, 257):  # our gradients in HF terms, through the export's own split
        if kind == "layer":
            for proj, ql in convert_qlora_layer(_with_grads(item, qtiny), arch).projs.items():
                grads[f"model.layers.{item.index}.{proj}"] = (ql.lora_a, ql.lora_b)

    _, peft_model = hf_qlora_model(tmp_path / "e", trainable=True)
    peft_model.train()
    logits = peft_model(batch[:, :-1]).logits
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(theirs, ours.detach(), rtol=1e-5, atol=1e-5)
    theirs.backward()
    named = dict(peft_model.named_modules())
    for module, (ga, gb) in grads.items():
        peft_layer = named[f"base_model.model.{module}"]
        torch.testing.assert_close(peft_layer.lora_A["default"].weight.grad, ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(peft_layer.lora_B["default"].weight.grad, gb, rtol=1e-4, atol=1e-6)
    assert len(grads) == 2 * 7


def _with_grads(piece, model):
    """A gathered layer whose lora_A / lora_B are replaced by their gradients (TP=1: no gather)."""
    layer = model.decoder.layers[piece.index]
    for key in list(piece.tensors):
        if key.endswith(("lora_A", "lora_B")):
            piece.tensors[key] = layer.get_submodule(key.rsplit(".", 1)[0]).get_parameter(key.rsplit(".", 1)[1]).grad
    return piece
