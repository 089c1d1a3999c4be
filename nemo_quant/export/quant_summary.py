"""The quantization blocks of the checkpoint configs, from the formats the layers were written in.

One format everywhere gives its QuantAlgo; several give MIXED_PRECISION with a per-layer
`quantized_layers` map (auto mixed precision). Layers left in high precision are listed in
`exclude_modules` (HF names for the HF checkpoint, TensorRT-LLM names for the TRT-LLM one).
"""
from __future__ import annotations

from nemo_quant.export.formats import GROUPED, QUANT_ALGO, ExportError, ExportFormat
from nemo_quant.export.hf_layout import HFLayer

# HF projection -> TensorRT-LLM module (q/k/v fuse into one qkv).
TRTLLM_MODULE = {
    "self_attn.q_proj": "attention.qkv", "self_attn.k_proj": "attention.qkv", "self_attn.v_proj": "attention.qkv",
    "self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}
AWQ = {ExportFormat.w4a16_awq, ExportFormat.w4a8_awq}


def layer_entry(fmt: ExportFormat, group: int) -> dict:
    entry: dict = {"quant_algo": QUANT_ALGO[fmt]}
    if fmt in GROUPED:
        entry["group_size"] = group
    if fmt in AWQ:
        entry.update(has_zero_point=False, pre_quant_scale=True)
    return entry


class QuantSummary:
    def __init__(self) -> None:
        self.modules: dict[str, tuple[ExportFormat, int]] = {}  # HF module name -> (format, group)
        self.kv_layers: list[bool] = []
        self.sparse_modules: list[str] = []  # HF names of the projections under a sparsity mask
        self.sparsity: dict | None = None  # {"n", "m", "method"} of the model's sparsity mode

    def add(self, layer: HFLayer) -> None:
        for proj, ql in layer.linears.items():
            self.modules[f"model.layers.{layer.index}.{proj}"] = (ql.fmt, layer.group_sizes.get(proj, 0))
        self.kv_layers.append(layer.kv_scales is not None)
        self.sparse_modules += [f"model.layers.{layer.index}.{proj}" for proj in layer.sparse_projs]

    def sparsity_config(self, trtllm: bool = False) -> dict | None:
        """The documented `sparsity_config` block (HF config.json and hf_quant_config.json; the
        TensorRT-LLM config.json as `sparsity`, with its module names): which modules hold an
        n:m pattern along their input dim, stored dense (the zeros in place)."""
        if self.sparsity is None or not self.sparse_modules:
            return None
        targets = self.sparse_modules
        if trtllm:
            targets = sorted({_trt_name(m) for m in targets}, key=_layer_order)
        return {"format": "dense", "sparsity_structure": f"{self.sparsity['n']}:{self.sparsity['m']}",
                "method": self.sparsity["method"], "targets": targets}

    @property
    def kinds(self) -> set[tuple[ExportFormat, int]]:
        return {v for v in self.modules.values() if v[0] != ExportFormat.none}

    @property
    def quant_algo(self) -> str | None:
        kinds = self.kinds
        if not kinds:
            return None
        return QUANT_ALGO[next(iter(kinds))[0]] if len(kinds) == 1 else "MIXED_PRECISION"

    @property
    def kv_cache_quant_algo(self) -> str | None:
        if any(self.kv_layers) and not all(self.kv_layers):
            raise ExportError("only some layers quantize their KV cache; checkpoint configs have one "
                              "kv_cache_quant_algo for the whole model.")
        return "FP8" if self.kv_layers and all(self.kv_layers) else None

    def _unquantized(self) -> list[str]:
        return [n for n, (f, _) in self.modules.items() if f == ExportFormat.none]

    def _algo_keys(self) -> dict:
        kinds = self.kinds
        if len(kinds) != 1:
            return {}
        entry = layer_entry(*next(iter(kinds)))
        entry.pop("quant_algo")
        return entry

    def hf_quant_config(self) -> dict:
        """The `quantization` block of hf_quant_config.json (ModelOpt's nested shape)."""
        quant = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo, **self._algo_keys()}
        quant["exclude_modules"] = ["lm_head", *self._unquantized()]
        if quant["quant_algo"] == "MIXED_PRECISION":
            quant["quantized_layers"] = {n: layer_entry(f, g) for n, (f, g) in self.modules.items() if f != ExportFormat.none}
        return quant

    def flat_quantization_config(self, producer: dict) -> dict:
        """config.json's `quantization_config` (flat shape; `quant_method: modelopt` selects the loader)."""
        quant = self.hf_quant_config()
        flat = {"quant_method": "modelopt", "quant_algo": quant["quant_algo"], "ignore": quant["exclude_modules"],
                "producer": producer}
        if quant["kv_cache_quant_algo"]:
            flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        if quant["quant_algo"] == "FP8":
            spec = {"dynamic": False, "num_bits": 8, "type": "float"}
            flat["config_groups"] = {"group_0": {"input_activations": spec, "weights": spec, "targets": ["Linear"]}}
        elif quant["quant_algo"] == "NVFP4":
            spec = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
            flat["config_groups"] = {"group_0": {"input_activations": spec, "weights": spec, "targets": ["Linear"]}}
        if "quantized_layers" in quant:
            flat["quantized_layers"] = quant["quantized_layers"]
        return flat

    def trtllm_quantization(self, pp: int) -> tuple[dict, dict | None]:
        """(config.json `quantization`, quant_cfg.json or None) with TensorRT-LLM module names."""
        quant = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo, **self._algo_keys()}
        excluded = sorted({_trt_name(n) for n in self._unquantized()})
        per_layer = {}
        if self.quant_algo == "MIXED_PRECISION":
            per_layer = {_trt_name(n): layer_entry(f, g) for n, (f, g) in self.modules.items() if f != ExportFormat.none}
        if pp > 1 and (excluded or per_layer):
            raise ExportError("layers differ in format and export.inference_pp > 1: TensorRT-LLM renumbers layers "
                              "per pipeline rank but shares one config, so per-layer formats would be ambiguous; "
                              "use export.inference_pp=1 (or the HF format).")
        if quant["quant_algo"] is not None:
            quant["exclude_modules"] = ["lm_head", *excluded]
        cfg_file = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": quant["kv_cache_quant_algo"],
                    "quantized_layers": per_layer} if per_layer else None
        return quant, cfg_file


def _trt_name(hf_module: str) -> str:
    _, _, index, *rest = hf_module.split(".")
    return f"transformer.layers.{index}.{TRTLLM_MODULE['.'.join(rest)]}"


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]), name) if len(parts) > 2 and parts[2].isdigit() else (-1, name)
