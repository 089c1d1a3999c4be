"""`nemo-quant validate <dir>`: check a unified HF or sharded TensorRT-LLM checkpoint against
the spec (checkpoint-formats.md): config keys, tensor names, shapes, dtypes and packing.

Pure Python over the safetensors headers (no torch, no tensor data read), written
independently of our writers so that it also judges checkpoints from other tools (tested on
ModelOpt's output) and does not share a bug with the code it checks.
"""
from __future__ import annotations

import fnmatch
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SCALAR = ([], [1])  # 0-d or [1]: writers differ, loaders accept both
HF_PROJS = {  # proj -> (out, in) as functions of the architecture
    "self_attn.q_proj": lambda a: (a.nh * a.d, a.h), "self_attn.k_proj": lambda a: (a.nkv * a.d, a.h),
    "self_attn.v_proj": lambda a: (a.nkv * a.d, a.h), "self_attn.o_proj": lambda a: (a.h, a.nh * a.d),
    "mlp.gate_proj": lambda a: (a.f, a.h), "mlp.up_proj": lambda a: (a.f, a.h), "mlp.down_proj": lambda a: (a.h, a.f),
}
TRT_MODULES = {  # module -> (out, in) on one TP rank
    "attention.qkv": lambda a, tp: ((a.nh // tp + 2 * -(-a.nkv // tp)) * a.d, a.h),
    "attention.dense": lambda a, tp: (a.h, a.nh // tp * a.d),
    "mlp.fc": lambda a, tp: (a.f // tp, a.h), "mlp.gate": lambda a, tp: (a.f // tp, a.h),
    "mlp.proj": lambda a, tp: (a.h, a.f // tp),
}


@dataclass
class Report:
    kind: str = "unknown"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Arch:
    h: int
    f: int
    layers: int
    nh: int
    nkv: int
    vocab: int
    d: int


def read_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def _check_file_layout(path: Path, header: dict, report: Report) -> None:
    """Offsets contiguous, sizes matching dtype x shape, data exactly filling the file."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4, "I64": 8, "BOOL": 1}
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, stop = e["data_offsets"]
        count = 1
        for s in e["shape"]:
            count *= s
        if start != end or stop - start != count * sizes.get(e["dtype"], 0):
            report.errors.append(f"{path.name}: {name} has offsets {e['data_offsets']} inconsistent with {e['dtype']}{e['shape']}")
        end = stop
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
    if path.stat().st_size != 8 + n + end:
        report.errors.append(f"{path.name}: file size {path.stat().st_size} != header + data ({8 + n + end}); truncated?")


# -- expected tensors of one quantized linear --------------------------------------------------
def _linear_expect(algo: str | None, out: int, inp: int, dtype: str, group: int, hf: bool, pqs: bool) -> dict:
    """suffix -> (allowed dtypes, allowed shapes, required)."""
    w, ws, ws2, act, pre = ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale") if hf else \
        ("weight", "weights_scaling_factor", "weights_scaling_factor_2", "activation_scaling_factor", "prequant_scaling_factor")
    pre_dtypes = {dtype, "F32", "BF16", "F16"}
    if algo is None:
        return {w: ({dtype}, [[out, inp]], True)}
    if algo == "FP8":
        return {w: ({"F8_E4M3"} if hf else {"F8_E4M3", "I8"}, [[out, inp]], True), ws: ({"F32"}, SCALAR, True),
                act: ({"F32"}, SCALAR, True)}
    if algo in ("W8A8_SQ_PER_CHANNEL", "W8A16"):
        e = {w: ({"I8"}, [[out, inp]], True), ws: ({"F32"}, [[out]], True)}
        if algo == "W8A8_SQ_PER_CHANNEL":
            e.update({act: ({"F32"}, SCALAR, True), pre: (pre_dtypes, [[inp]], True)})
        return e
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        e = {w: ({"U8", "I8"}, [[out // 2, inp]], True), ws: ({"F32", dtype}, [[out, inp // max(group, 1)]], True),
             pre: (pre_dtypes, [[inp]], pqs)}
        if algo == "W4A8_AWQ":
            e.update({ws2: ({"F32"}, SCALAR, True), act: ({"F32"}, SCALAR, True)})
        return e
    if algo == "NVFP4":
        return {w: ({"U8"}, [[out, inp // 2]], True), ws: ({"F8_E4M3"}, [[out, inp // 16]], True),
                ws2: ({"F32"}, SCALAR, True), act: ({"F32"}, SCALAR, True)}
    raise KeyError(algo)


def _packing(algo: str | None, out: int, inp: int, group: int, where: str, report: Report) -> None:
    if algo == "NVFP4" and inp % 16:
        report.errors.append(f"{where}: NVFP4 needs the input dim ({inp}) divisible by 16")
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        if not group or inp % group:
            report.errors.append(f"{where}: input dim {inp} is not a multiple of group_size {group}")
        if out % 2:
            report.errors.append(f"{where}: INT4 packs pairs of output rows; {out} rows is odd")


def _compare(expected: dict[str, tuple], header: dict, where: str, report: Report) -> None:
    for name, (dtypes, shapes, required) in expected.items():
        if name not in header:
            if required:
                report.errors.append(f"{where}: missing tensor {name}")
            continue
        e = header[name]
        if e["dtype"] not in dtypes:
            report.errors.append(f"{where}: {name} has dtype {e['dtype']}, expected {' or '.join(sorted(dtypes))}")
        if e["shape"] not in shapes:
            report.errors.append(f"{where}: {name} has shape {e['shape']}, expected {' or '.join(map(str, shapes))}")
    for name in sorted(set(header) - set(expected)):
        report.errors.append(f"{where}: unexpected tensor {name}")


class QuantBlock:
    """Which QuantAlgo (and group size) a module has, from a quantization block."""

    def __init__(self, quant: dict, per_layer: dict | None = None):
        self.algo = quant.get("quant_algo")
        self.group = quant.get("group_size") or (16 if self.algo == "NVFP4" else 128)
        self.pqs = bool(quant.get("pre_quant_scale", self.algo in ("W4A16_AWQ", "W4A8_AWQ")))
        self.exclude = quant.get("exclude_modules") or []
        self.per_layer = per_layer if per_layer is not None else quant.get("quantized_layers", {})
        self.kv = quant.get("kv_cache_quant_algo")

    def of(self, module: str) -> tuple[str | None, int]:
        if self.algo == "MIXED_PRECISION":
            entry = self.per_layer.get(module)
            return (entry["quant_algo"], entry.get("group_size") or 0) if entry else (None, 0)
        if any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*") for p in self.exclude):
            return None, 0
        return self.algo, self.group


def _require(config: dict, keys: list[str], where: str, report: Report) -> bool:
    missing = [k for k in keys if k not in config]
    if missing:
        report.errors.append(f"{where}: missing required keys {missing}")
    return not missing


# -- unified HF ------------------------------------------------------------------------------
def _hf_arch(config: dict) -> Arch:
    nh = config["num_attention_heads"]
    return Arch(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], nh,
                config.get("num_key_value_heads", nh), config["vocab_size"],
                config.get("head_dim") or config["hidden_size"] // nh)


def hf_quant_block(directory: Path, config: dict, report: Report) -> QuantBlock:
    nested = directory / "hf_quant_config.json"
    flat = config.get("quantization_config")
    quant = json.loads(nested.read_text()).get("quantization", {}) if nested.is_file() else None
    if flat is not None and quant is not None and flat.get("quant_algo") != quant.get("quant_algo"):
        report.errors.append(f"config.json quantization_config.quant_algo={flat.get('quant_algo')!r} disagrees with "
                             f"hf_quant_config.json ({quant.get('quant_algo')!r})")
    if quant is None and flat is not None:
        if flat.get("quant_algo") in ("W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL"):
            report.warnings.append("no hf_quant_config.json: the flat config carries no group_size for this format")
        quant = {"quant_algo": flat.get("quant_algo"), "exclude_modules": flat.get("ignore"),
                 "group_size": flat.get("group_size"), "quantized_layers": flat.get("quantized_layers", {}),
                 "kv_cache_quant_algo": "FP8" if flat.get("kv_cache_scheme") else None}
    if quant is not None and quant.get("quant_algo") == "NVFP4":
        for key in ("group_size", "kv_cache_quant_algo", "exclude_modules"):
            if key not in quant:
                report.errors.append(f"hf_quant_config.json: vLLM requires quantization.{key} for NVFP4")
    return QuantBlock(quant or {})


def _hf_headers(directory: Path, report: Report) -> dict[str, dict]:
    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        report.errors.append("no *.safetensors files")
        return {}
    merged: dict[str, dict] = {}
    owner: dict[str, str] = {}
    for f in files:
        header = read_header(f)
        _check_file_layout(f, header, report)
        for name, e in header.items():
            if name in merged:
                report.errors.append(f"{name} appears in {owner[name]} and {f.name}")
            merged[name], owner[name] = e, f.name
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        for name, fname in weight_map.items():
            if owner.get(name) != fname:
                report.errors.append(f"index maps {name} to {fname}, found in {owner.get(name)}")
        for name in set(owner) - set(weight_map):
            report.errors.append(f"{name} ({owner[name]}) is not in model.safetensors.index.json")
    elif len(files) > 1:
        report.errors.append(f"{len(files)} safetensors files but no model.safetensors.index.json")
    return merged


def validate_hf(directory: Path, report: Report) -> None:
    config = json.loads((directory / "config.json").read_text())
    if is_compressed_tensors(config):
        from nemo_quant.export.validate_ct import validate_compressed_tensors

        validate_compressed_tensors(directory, config, report)
        return
    checked = read_hf_directory(directory, config, report)
    if checked is None:
        return
    a, dtype, header, expected = checked
    quant = hf_quant_block(directory, config, report)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        for proj, dims in HF_PROJS.items():
            out, inp = dims(a)
            algo, group = quant.of(p + proj)
            _packing(algo, out, inp, group, p + proj, report)
            needs_pqs = quant.pqs and proj in ("self_attn.o_proj", "mlp.down_proj")
            for suffix, e in _linear_expect(algo, out, inp, dtype, group, True, needs_pqs).items():
                expected[f"{p}{proj}.{suffix}"] = e
        if quant.kv:
            # ModelOpt writes self_attn.{k,v}_proj.{k,v}_scale (HF path) or self_attn.{k,v}_scale (Megatron path).
            for r in ("k", "v"):
                name = next((n for n in (f"{p}self_attn.{r}_proj.{r}_scale", f"{p}self_attn.{r}_scale") if n in header),
                            f"{p}self_attn.{r}_proj.{r}_scale")
                expected[name] = ({"F32"}, SCALAR, True)
    _compare(expected, header, "model", report)
    if "sparsity_config" in config:
        from nemo_quant.export.validate_sparsity import check_declared, hf_tensor_reader

        check_declared(config["sparsity_config"], hf_tensor_reader(directory), lambda mod: quant.of(mod)[0],
                       "config.json sparsity_config", report.errors)


def is_compressed_tensors(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def read_hf_directory(directory: Path, config: dict, report: Report):
    """What every HF-layout checkpoint shares: (arch, dtype, merged tensor headers, expected
    embedding / norm / lm_head entries), or None when config.json lacks the keys."""
    if not _require(config, ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "vocab_size"], "config.json", report):
        return None
    a = _hf_arch(config)
    dtype = DTYPE_NAMES.get(config.get("torch_dtype") or config.get("dtype"), "BF16")
    header = _hf_headers(directory, report)
    report.tensors = len(header)
    expected = {"model.embed_tokens.weight": ({dtype}, [[a.vocab, a.h]], True),
                "model.norm.weight": ({dtype}, [[a.h]], True)}
    if not config.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = ({dtype}, [[a.vocab, a.h]], True)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        expected[p + "input_layernorm.weight"] = ({dtype}, [[a.h]], True)
        expected[p + "post_attention_layernorm.weight"] = ({dtype}, [[a.h]], True)
    return a, dtype, header, expected


# -- TensorRT-LLM ------------------------------------------------------------------------------
def validate_trtllm(directory: Path, report: Report) -> None:
    config = json.loads((directory / "config.json").read_text())
    if not _require(config, ["architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "vocab_size"], "config.json", report):
        return
    if config["architecture"] == "LlamaForCausalLM" and "position_embedding_type" not in config:
        report.errors.append("config.json: LlamaForCausalLM needs position_embedding_type (TRT-LLM defaults to learned_absolute)")
    mapping = config.get("mapping", {"world_size": 1, "tp_size": 1, "pp_size": 1})
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    if mapping.get("world_size", tp * pp) != tp * pp:
        report.errors.append(f"mapping.world_size={mapping.get('world_size')} != tp_size*pp_size={tp * pp}")
    nh = config["num_attention_heads"]
    a = Arch(config["hidden_size"], config.get("intermediate_size", 4 * config["hidden_size"]), config["num_hidden_layers"],
             nh, config.get("num_key_value_heads", nh), config["vocab_size"], config.get("head_size") or config["hidden_size"] // nh)
    if a.layers % pp:
        report.errors.append(f"num_hidden_layers={a.layers} is not divisible by pp_size={pp}")
        return
    quant_block = config.get("quantization") or {}
    per_layer = None
    if quant_block.get("quant_algo") == "MIXED_PRECISION":
        cfg_file = directory / "quant_cfg.json"
        per_layer = json.loads(cfg_file.read_text()).get("quantized_layers", {}) if cfg_file.is_file() else {}
        if not cfg_file.is_file():
            report.errors.append("quant_algo MIXED_PRECISION without quant_cfg.json")
    quant = QuantBlock(quant_block, per_layer)
    if quant.algo and "group_size" not in quant_block and quant.algo in ("W4A16_AWQ", "W4A8_AWQ", "NVFP4"):
        report.warnings.append("quantization.group_size not written: TRT-LLM's default is 128")
    dtype = DTYPE_NAMES.get(config["dtype"], config["dtype"])
    vocab_r = -(-a.vocab // tp)
    parallel_embedding = config.get("use_parallel_embedding", False)
    per_stage = a.layers // pp
    extra = sorted(f.name for f in directory.glob("rank*.safetensors") if int(f.stem[4:]) >= tp * pp)
    if extra:
        report.errors.append(f"rank files beyond world_size {tp * pp}: {extra}")
    for rank in range(tp * pp):
        path = directory / f"rank{rank}.safetensors"
        if not path.is_file():
            report.errors.append(f"missing {path.name} (world_size {tp * pp})")
            continue
        header = read_header(path)
        _check_file_layout(path, header, report)
        report.tensors += len(header)
        stage = rank // tp
        expected = {}
        if stage == 0:
            rows = vocab_r if parallel_embedding and config.get("embedding_sharding_dim", 0) == 0 else a.vocab
            expected["transformer.vocab_embedding.weight"] = ({dtype}, [[rows, a.h]], True)
        if stage == pp - 1:
            expected["transformer.ln_f.weight"] = ({dtype}, [[a.h]], True)
            expected["lm_head.weight"] = ({dtype}, [[vocab_r, a.h]], not config.get("share_embedding_table", False))
            if config["architecture"] == "MedusaForCausalLM":
                from nemo_quant.export.validate_draft import trtllm_medusa_expected

                expected.update(trtllm_medusa_expected(config, dtype, vocab_r, tp))
        for j in range(per_stage):
            p = f"transformer.layers.{j}."
            expected[p + "input_layernorm.weight"] = ({dtype}, [[a.h]], True)
            expected[p + "post_layernorm.weight"] = ({dtype}, [[a.h]], True)
            for module, dims in TRT_MODULES.items():
                out, inp = dims(a, tp)
                # quant_cfg.json names layers globally; exclude_modules as the rank's model does.
                layer = stage * per_stage + j if quant.algo == "MIXED_PRECISION" else j
                algo, group = quant.of(f"transformer.layers.{layer}.{module}")
                _packing(algo, out, inp, group, f"{path.name}: {p}{module}", report)
                for suffix, e in _linear_expect(algo, out, inp, dtype, group, False, quant.pqs).items():
                    expected[f"{p}{module}.{suffix}"] = e
            if quant.kv:
                expected[p + "attention.kv_cache_scaling_factor"] = ({"F32"}, SCALAR, True)
                for opt in ("k_cache_scaling_factor", "v_cache_scaling_factor", "kv_cache_rcp_scaling_factor"):
                    expected[p + "attention." + opt] = ({"F32"}, SCALAR, False)
        _compare(expected, header, path.name, report)
    if "sparsity" in config:
        _check_trtllm_sparsity(directory, config["sparsity"], quant, tp, per_stage, report)


def _check_trtllm_sparsity(directory: Path, block: dict, quant: QuantBlock, tp: int, per_stage: int,
                           report: Report) -> None:
    """Each global target `transformer.layers.<i>.<module>` on every TP rank of its stage."""
    from safetensors import safe_open

    from nemo_quant.export.validate_sparsity import check_declared

    for tp_rank in range(tp):
        def read(module: str, tp_rank=tp_rank):
            _, _, index, *rest = module.split(".")
            stage, local = divmod(int(index), per_stage)
            path = directory / f"rank{stage * tp + tp_rank}.safetensors"
            name = f"transformer.layers.{local}.{'.'.join(rest)}.weight"
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(name) if name in fh.keys() else None

        def algo_of(module: str) -> str | None:
            layer = module.split(".")[2]
            return quant.of(module if quant.algo == "MIXED_PRECISION" else module.replace(layer, str(int(layer) % per_stage), 1))[0]

        check_declared(block, read, algo_of, f"config.json sparsity (TP rank {tp_rank})", report.errors)


def validate_checkpoint(directory: str | Path) -> Report:
    from nemo_quant.export.validate_draft import draft_kind, validate_draft
    from nemo_quant.export.validate_qlora import is_bnb_nf4, validate_bnb_nf4, validate_peft

    directory = Path(directory)
    report = Report()
    if (directory / "adapter_config.json").is_file():
        validate_peft(directory, report)
        return report
    if (directory / "base").is_dir() and (directory / "adapter").is_dir():  # export.format=peft: both halves
        base, adapter = validate_checkpoint(directory / "base"), validate_checkpoint(directory / "adapter")
        report.kind = f"{base.kind} + {adapter.kind}"
        report.tensors = base.tensors + adapter.tensors
        report.errors = [f"base: {e}" for e in base.errors] + [f"adapter: {e}" for e in adapter.errors]
        report.warnings = base.warnings + adapter.warnings
        return report
    if not (directory / "config.json").is_file():
        report.errors.append(f"{directory}: no config.json (not a checkpoint directory)")
        return report
    config = json.loads((directory / "config.json").read_text())
    if "architecture" in config and (directory / "rank0.safetensors").is_file():
        report.kind = "trtllm"
        validate_trtllm(directory, report)
    elif draft_kind(config) is not None:
        validate_draft(directory, config, report)
    elif is_bnb_nf4(config):
        report.kind = "bitsandbytes-nf4"
        validate_bnb_nf4(directory, config, report)
    else:
        report.kind = "compressed-tensors" if is_compressed_tensors(config) else "hf"
        validate_hf(directory, report)
    return report


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nemo-quant validate <checkpoint dir> [<dir> ...]")
        return 0 if argv else 2
    status = 0
    for d in argv:
        report = validate_checkpoint(d)
        verdict = "OK" if report.ok else f"{len(report.errors)} error(s)"
        print(f"{d}: {report.kind} checkpoint, {report.tensors} tensors: {verdict}")
        for w in report.warnings:
            print(f"  warning: {w}")
        for e in report.errors[:50]:
            print(f"  error: {e}")
        if len(report.errors) > 50:
            print(f"  ... and {len(report.errors) - 50} more")
        status |= 0 if report.ok else 1
    return status
