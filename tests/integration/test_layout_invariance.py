"""SmolLM2 exports are byte-identical at TP=1, TP=3 and PP=2: every calibration decision is
independent of the layout (README, "Layout-invariant calibration").

One preset per algorithm family: max (fp8), SmoothQuant (int8_sq), AWQ scale + clip
(int4_awq, groups of 64), GPTQ (int4_gptq, groups of 64, layers 0-9), the searching calibrators (MSE
weights, percentile inputs) and auto mixed precision, whose plan comes from gradients and is
therefore compared as decisions (the plan), then as bytes. TP=1 runs on 2 threads, the other
layouts on 1 thread per rank, so thread-count-dependent rounding would show too.
"""
from dataclasses import replace

import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import workers

pytestmark = [pytest.mark.real_model, pytest.mark.distributed]

LAYOUTS = [(1, 1, 2), (3, 1, 1), (1, 2, 1)]  # (tp, pp, threads per rank)


def _presets() -> dict:
    from nemo_quant.quantization.config import CalibratorName, QFormat
    from nemo_quant.quantization.mixed_precision import load_preset

    def group64(cfg):
        return replace(cfg, weight=replace(cfg.weight, block_size=64))

    def coarse(cfg):  # fewer search candidates: same code paths, a shorter test
        return replace(cfg, search=replace(cfg.search, scale_grid=4, clip_grid=4))

    w8a8 = load_preset("int8_sq")
    searching = replace(w8a8, name="int8_mse_percentile", algorithm="max",
                        weight=replace(w8a8.weight, calibrator=CalibratorName.mse),
                        input=replace(w8a8.input, calibrator=CalibratorName.percentile))
    auto = load_preset("auto")
    auto = replace(auto, auto=replace(auto.auto, score_windows=2))
    assert QFormat(searching.weight.format) == QFormat.int8
    # GPTQ is the slow one (every rank runs TP=1's GPTQ): layers 0-9 are enough to compare.
    gptq = group64(load_preset("int4_gptq"))
    gptq = replace(gptq, exclude=gptq.exclude + ["decoder.layers.1?.*", "decoder.layers.2?.*"])
    return {"fp8": load_preset("fp8"), "int8_sq": coarse(load_preset("int8_sq")),
            "int4_awq": coarse(group64(load_preset("int4_awq"))),
            "int4_gptq": gptq, "int8_mse_percentile": searching, "auto": auto}


@pytest.fixture(scope="module")
def calibration_tokens(smollm2_path):
    from nemo_quant.data import austen
    from nemo_quant.data.windows import token_windows
    from nemo_quant.models.tokenizer import tokenizer_from_gguf

    ids = tokenizer_from_gguf(smollm2_path).encode(austen.calibration_text()[:20000]).ids
    return token_windows(ids, 2, 256)


@pytest.fixture(scope="module")
def digests(smollm2_path, calibration_tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    presets = _presets()
    found = {}
    for tp, pp, threads in LAYOUTS:
        found[(tp, pp)] = run_distributed(workers.layout_export_digests, tp * pp, str(smollm2_path), tp, pp, threads,
                                          presets, calibration_tokens, str(out), timeout_s=900)[0]
        print(f"TP={tp} PP={pp}: " + ", ".join(f"{n} {d['seconds']:.1f} s" for n, d in found[(tp, pp)].items()))
    return found


@pytest.mark.parametrize("layout", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
@pytest.mark.parametrize("preset", ["fp8", "int8_sq", "int4_awq", "int4_gptq", "int8_mse_percentile", "auto"])
def test_export_bytes_equal_tp1(digests, layout, preset):
    reference, other = digests[(1, 1)][preset], digests[layout][preset]
    assert other["plan"] == reference["plan"]  # decisions first (auto: the per-layer formats)
    assert other["files"].keys() == reference["files"].keys()
    differing = [f for f in reference["files"] if other["files"][f] != reference["files"][f]]
    assert not differing, f"{preset} at TP x PP = {layout}: {differing} differ from TP=1's bytes"


def test_auto_plan_mixes_formats(digests):
    """The plan comparison above means something only if the plan is not trivial."""
    formats = {fmt for _, fmt in digests[(1, 1)]["auto"]["plan"]}
    assert len(formats) >= 2, formats
