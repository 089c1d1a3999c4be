"""Export numerics without a model: packing layouts, dequantization equal to fake quantization,
scale <-> amax recovery, the streaming safetensors writer."""
import json

import pytest
import torch
from safetensors import safe_open

from nemo_quant.export.formats import (
    ExportError, ExportFormat, dequantize, e2m1_codes, e2m1_values, export_format, pack_e2m1, pack_int4_rows,
    quantize_linear, unpack_e2m1, unpack_int4_rows,
)
from nemo_quant.export.reload import amax_for_scale
from nemo_quant.export.safetensors_writer import ShardedWriter
from nemo_quant.numerics.fp8 import fp8_scale
from nemo_quant.numerics.minifloat import E4M3
from nemo_quant.quantization.config import QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant


def _weight(out=32, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.1
    w[0] = 0.0  # an all-zero row: scale 1, codes 0
    w[1, :16] = 0.0  # an all-zero block
    w[2, 5] = 40.0  # an outlier
    return w


CASES = {
    ExportFormat.fp8: (QuantizerSpec(format="fp8_e4m3"), lambda w: w.abs().amax()),
    ExportFormat.int8_sq: (QuantizerSpec(format="int8", granularity="channel"), lambda w: w.abs().amax(1, keepdim=True)),
    ExportFormat.w4a16_awq: (QuantizerSpec(format="int4", granularity="block", block_size=16),
                             lambda w: w.abs().reshape(w.shape[0], -1, 16).amax(-1)),
    ExportFormat.nvfp4: (QuantizerSpec(format="nvfp4", granularity="block"), lambda w: w.abs().amax()),
}


@pytest.mark.parametrize("fmt", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_export_equals_fake_quant(fmt, dtype):
    spec, amax_of = CASES[fmt]
    w = _weight().to(dtype)
    amax = amax_of(w.float())
    ql = quantize_linear(fmt, w, amax, torch.tensor(3.0), torch.ones(w.shape[1]), 16)
    assert torch.equal(dequantize(ql, dtype), fake_quant(w, spec, amax))


def test_int4_rows_pack_two_output_rows_per_byte():
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)
    packed = pack_int4_rows(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 3)
    # low nibble: row 0, high nibble: row 1 (two's complement nibbles)
    assert packed.tolist() == [[0x8 | (0x1 << 4), 0x7 | (0xF << 4), 0x0 | (0x3 << 4)]]
    rand = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(rand)), rand)


def test_e2m1_codes_follow_the_spec_table():
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0])
    codes = e2m1_codes(values)
    assert codes.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15]  # bit 3 = sign, bits 0-2 = index
    assert torch.equal(e2m1_values(codes), values)
    packed = pack_e2m1(codes[:8].reshape(1, 8))
    assert packed.tolist() == [[0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4, 6 | 7 << 4]]  # along the input dim
    assert torch.equal(unpack_e2m1(packed), codes[:8].reshape(1, 8))


def test_w4a8_second_scale_keeps_the_fp8_gemm_in_range():
    w = _weight()
    amax = w.abs().reshape(w.shape[0], -1, 16).amax(-1)
    ql = quantize_linear(ExportFormat.w4a8_awq, w, amax, torch.tensor(2.0), torch.ones(64), 16)
    assert ql.weight_scale_2 == fp8_scale(amax.amax(), E4M3)
    # What TRT-LLM computes: q * (ws / ws2) must stay within E4M3's 448.
    assert (ql.weight.float().abs().reshape(32, -1, 16) * (ql.weight_scale / ql.weight_scale_2).unsqueeze(-1)).max() <= 448


def test_unexportable_combinations_name_the_keys():
    with pytest.raises(ExportError, match="quant.weight=mxfp8/block"):
        export_format(QuantizerSpec(format="mxfp8", granularity="block"), None, "decoder.layers.0.mlp.linear_fc1")
    with pytest.raises(ExportError, match="block_size"):
        export_format(QuantizerSpec(format="nvfp4", granularity="block", block_size=32),
                      QuantizerSpec(format="nvfp4", granularity="block"), "x")


@pytest.mark.parametrize("qmax,fn", [(448.0, lambda a: fp8_scale(a, E4M3)), (7.0, lambda a: a / 7.0)])
def test_amax_for_scale_reproduces_every_scale(qmax, fn):
    scales = fn(torch.rand(10000, generator=torch.Generator().manual_seed(0)) * 10 + 1e-4)
    amax = amax_for_scale(scales, qmax, fn)
    assert torch.equal(fn(amax), scales)


def test_sharded_writer_round_trips_every_dtype_and_splits_by_size(tmp_path):
    tensors = {
        "a.f32": torch.randn(3, 5), "b.bf16": torch.randn(7).bfloat16(), "c.f16": torch.randn(2, 2).half(),
        "d.i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8), "e.u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "f.fp8": torch.randn(4, 8).to(torch.float8_e4m3fn), "g.scalar": torch.tensor(3.5),
    }
    writer = ShardedWriter(tmp_path, "model", max_shard_bytes=64)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) > 1 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], framework="pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                           t.view(torch.uint8) if t.dtype.itemsize == 1 else t)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("model")]


@pytest.mark.parametrize("reserve", [1 << 20, 64])  # the header fits its reservation, or outgrows it
def test_streamed_file_reads_back_with_safetensors(tmp_path, reserve):
    from nemo_quant.export.safetensors_writer import SafetensorsFile

    tensors = {f"layer.{i}.weight": torch.randn(5, 3) * i for i in range(12)}
    f = SafetensorsFile(tmp_path / "x.safetensors", header_reserve=reserve)
    for name, t in tensors.items():
        f.add(name, t)
    f.close()
    with safe_open(tmp_path / "x.safetensors", framework="pt") as h:
        assert sorted(h.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(h.get_tensor(name), t)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_single_shard_is_model_safetensors_and_abort_leaves_nothing(tmp_path):
    writer = ShardedWriter(tmp_path, "model")
    writer.add("x", torch.ones(3))
    assert [f.name for f in writer.close()] == ["model.safetensors"]
    aborted = ShardedWriter(tmp_path / "sub", "model")
    (tmp_path / "sub").mkdir()
    aborted.add("x", torch.ones(3))
    aborted.abort()
    assert list((tmp_path / "sub").iterdir()) == []
