"""Minitron pruning on the tiny model in one process: importance with a known answer, the pruned
model equal to slicing the Hugging Face weights by hand, the masked view equal to the surgery,
checkpoints that replay the plan, and every bad input refused before work."""
import json

import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import ModeError, apply_modes, get_mode, mode_config
from nemo_quant.pruning.decide import Sizes, kept_heads, top_sorted
from nemo_quant.quantization.forward_loop import windows_forward_loop
from tests.tiny_models import TINY, tiny_hf_tensors, write_hf_checkpoint

CALIB = (torch.arange(4 * 17).reshape(4, 17) * 37) % 257
EVALS = (torch.arange(2 * 17).reshape(2, 17) * 11 + 5) % 257
ALL = dict(ffn_hidden_size=64, num_layers=3, hidden_size=48, num_attention_heads=2, num_query_groups=1)


def _load(path):
    from nemo_quant.models.loading import load_model

    return load_model(str(path))


def _prune(model, **target):
    apply_modes(model, [("prune", {"target": target})])
    return get_mode("prune").data_step(model, windows_forward_loop(CALIB))


def _logits(model, tokens=EVALS):
    from tests.quant_helpers import logits

    return logits(model, tokens)


def test_top_sorted_and_gqa_consistent_heads():
    assert top_sorted(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2) == [1, 3]  # ties: lower index first
    groups, heads = kept_heads(torch.tensor([1.0, 5.0, 0.0, 0.1, 4.0, 4.0]), groups=3, keep_groups=2, keep_heads=2)
    assert groups == [0, 2] and heads == [1, 4]  # one head per kept group, the best of each


def _tiny_with_dead_parts(tmp_path):
    """Neuron 7 of layer 0 dead (its gate and up rows zero), KV group 1 of layer 1 dead (its V rows
    zero: its heads output nothing), layer 2 an identity (its o_proj and down_proj zero)."""
    t = tiny_hf_tensors(TINY)
    d = TINY.head_dim
    t["model.layers.0.mlp.gate_proj.weight"][7] = 0
    t["model.layers.0.mlp.up_proj.weight"][7] = 0
    t["model.layers.1.self_attn.v_proj.weight"][d:2 * d] = 0
    t["model.layers.2.self_attn.o_proj.weight"].zero_()
    t["model.layers.2.mlp.down_proj.weight"].zero_()
    return write_hf_checkpoint(tmp_path / "dead", TINY, tensors=t)


@pytest.mark.parametrize("score", ["activation", "output"])
def test_dead_neuron_group_and_layer_go_first(megatron_tp1, tmp_path, score):
    from nemo_quant.pruning.importance import measure_importance

    loaded = _load(_tiny_with_dead_parts(tmp_path))
    imp = measure_importance(loaded.model, windows_forward_loop(CALIB), score)
    assert int(imp.neurons[0].argmin()) == 7
    assert imp.heads[1][2:].max() == 0 and imp.heads[1][:2].min() > 0  # group 1 = heads 2, 3
    assert int(imp.layers.argmin()) == 2 and float(imp.layers[2]) < 1e-6
    apply_modes(loaded.model, [("prune", {"target": {"ffn_hidden_size": 95, "num_query_groups": 1, "num_layers": 3},
                                          "channel_score": score})])
    get_mode("prune").data_step(loaded.model, windows_forward_loop(CALIB))
    plan = mode_config(loaded.model, "prune").plan
    assert plan["layers"] == [0, 1, 3] and 7 not in plan["ffn"][0] and plan["groups"][1] == [0]


def _hand_sliced(plan, arch=TINY):
    """The plan applied to the HF tensors by hand: rows/columns picked per projection."""
    t, d = tiny_hf_tensors(arch), arch.head_dim
    hidden = torch.tensor(plan["hidden"])
    out = {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:, hidden],
           "model.norm.weight": t["model.norm.weight"][hidden]}
    for j, g in enumerate(plan["layers"]):
        src, dst = f"model.layers.{g}.", f"model.layers.{j}."
        heads = torch.tensor([h * d + i for h in plan["heads"][j] for i in range(d)])
        kv = torch.tensor([g_ * d + i for g_ in plan["groups"][j] for i in range(d)])
        ffn = torch.tensor(plan["ffn"][j])
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[dst + norm] = t[src + norm][hidden]
        out[dst + "self_attn.q_proj.weight"] = t[src + "self_attn.q_proj.weight"][heads][:, hidden]
        out[dst + "self_attn.k_proj.weight"] = t[src + "self_attn.k_proj.weight"][kv][:, hidden]
        out[dst + "self_attn.v_proj.weight"] = t[src + "self_attn.v_proj.weight"][kv][:, hidden]
        out[dst + "self_attn.o_proj.weight"] = t[src + "self_attn.o_proj.weight"][hidden][:, heads]
        out[dst + "mlp.gate_proj.weight"] = t[src + "mlp.gate_proj.weight"][ffn][:, hidden]
        out[dst + "mlp.up_proj.weight"] = t[src + "mlp.up_proj.weight"][ffn][:, hidden]
        out[dst + "mlp.down_proj.weight"] = t[src + "mlp.down_proj.weight"][hidden][:, ffn]
    return out


def test_pruned_model_equals_slicing_the_weights_by_hand(megatron_tp1, tiny_dir, tmp_path):
    loaded = _load(tiny_dir / "hf")
    report = _prune(loaded.model, **ALL)
    plan = mode_config(loaded.model, "prune").plan
    arch = Sizes(**plan["sizes"]).arch(TINY)
    assert report["params_after"] == arch.parameter_count() < report["params_before"] == TINY.parameter_count()
    assert loaded.arch == arch and arch.head_dim == TINY.head_dim  # heads keep their width
    by_hand = _load(write_hf_checkpoint(tmp_path / "by_hand", arch, tensors=_hand_sliced(plan)))
    assert torch.equal(_logits(loaded.model), _logits(by_hand.model))


def test_masked_view_scores_what_the_surgery_gives(megatron_tp1, tiny_dir):
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.pruning.masked_view import masked_loss

    loaded = _load(tiny_dir / "hf")
    reference = _load(tiny_dir / "hf")
    _prune(loaded.model, **ALL)
    plan = mode_config(loaded.model, "prune").plan
    after = perplexity(loaded.model, CALIB, loaded.vocab_size).mean_nll
    assert masked_loss(reference.model, plan, CALIB) == pytest.approx(after, abs=2e-4)  # RMSNorm eps only


def test_parameter_budget_search_meets_the_budget_with_the_least_loss(megatron_tp1, tiny_dir):
    loaded = _load(tiny_dir / "hf")
    budget = 0.8 * TINY.parameter_count()
    apply_modes(loaded.model, [("prune", {"target": {"params": budget}, "search": {
        "hidden_step": 16, "ffn_step": 16, "tolerance": 0.05, "candidates": 4}})])
    report = get_mode("prune").data_step(loaded.model, windows_forward_loop(CALIB))
    assert budget * 0.95 <= report["params_after"] <= budget
    losses = [c["loss"] for c in report["searched"]]
    assert len(losses) > 1 and min(losses) == next(c["loss"] for c in report["searched"] if c["sizes"] == report["sizes"])
    assert loaded.arch.parameter_count() == report["params_after"]


def test_skip_loss_layer_score_drops_the_identity_layer(megatron_tp1, tmp_path):
    loaded = _load(_tiny_with_dead_parts(tmp_path))
    apply_modes(loaded.model, [("prune", {"target": {"num_layers": 3}, "layer_score": "skip_loss"})])
    get_mode("prune").data_step(loaded.model, windows_forward_loop(CALIB))
    assert mode_config(loaded.model, "prune").plan["layers"] == [0, 1, 3]


def test_checkpoint_replays_the_plan_and_hf_export_reloads(megatron_tp1, tiny_dir, tmp_path):
    from nemo_quant.checkpoint.model_checkpoint import load_into, load_model_checkpoint, save_model
    from nemo_quant.export.writer import export_checkpoint

    loaded = _load(tiny_dir / "hf")
    _prune(loaded.model, **ALL)
    want = _logits(loaded.model)
    save_model(loaded.model, loaded.source.arch, tmp_path / "ck")
    assert torch.equal(_logits(load_model_checkpoint(tmp_path / "ck")), want)
    fresh = _load(tiny_dir / "hf")  # the unpruned model: the replay prunes it, then the weights load
    assert torch.equal(_logits(load_into(fresh.model, tmp_path / "ck")), want)
    export_checkpoint(loaded.model, loaded.arch, {"format": "hf", "path": str(tmp_path / "hf"), "dtype": "float32"}, loaded.tokenizer)
    assert torch.equal(_logits(_load(tmp_path / "hf").model), want)
    export_checkpoint(loaded.model, loaded.arch, {"format": "trtllm", "path": str(tmp_path / "trt")}, loaded.tokenizer)
    trt = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert (trt["num_hidden_layers"], trt["hidden_size"], trt["intermediate_size"], trt["head_size"],
            trt["num_attention_heads"], trt["num_key_value_heads"]) == (3, 48, 64, TINY.head_dim, 2, 1)


def test_exported_pruned_model_reproduces_our_logits_in_transformers(megatron_tp1, tiny_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from nemo_quant.export.writer import export_checkpoint

    loaded = _load(tiny_dir / "hf")
    _prune(loaded.model, **ALL)
    export_checkpoint(loaded.model, loaded.arch, {"format": "hf", "path": str(tmp_path / "hf"), "dtype": "float32"}, loaded.tokenizer)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 3 and hf.config.head_dim == TINY.head_dim and hf.config.hidden_size == 48
    with torch.no_grad():
        theirs = hf(EVALS).logits
    torch.testing.assert_close(theirs, _logits(loaded.model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target,match", [
    ({"ffn_hidden_size": 200}, r"prune.target.ffn_hidden_size=200 exceeds the model's 96"),
    ({"num_attention_heads": 3}, r"prune.target.num_attention_heads=3 breaks GQA"),
    ({"num_query_groups": 1, "num_attention_heads": 4}, r"breaks GQA with 1 KV groups"),
    ({"params": 1e3}, r"prune.target.params=1000: no allowed size"),
    ({"params": 1e9}, r"not below the model's"),
])
def test_bad_targets_are_refused_before_work(megatron_tp1, tiny_model, target, match):
    from nemo_quant.preflight import PreflightError, preflight

    before = {k: v.clone() for k, v in tiny_model.state_dict().items() if v is not None}
    with pytest.raises(PreflightError, match=match):
        preflight(tiny_model, TINY, [("prune", {"target": target})])
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


def test_empty_target_and_pruning_after_quantization_are_refused(megatron_tp1, tiny_model):
    from tests.quant_helpers import INT8_SQ

    with pytest.raises(ConfigError, match="prune.target sets nothing"):
        apply_modes(tiny_model, [("prune", {})])
    apply_modes(tiny_model, [("quantize", INT8_SQ)])
    with pytest.raises(ModeError, match="mode 'prune' cannot be applied after 'quantize'"):
        apply_modes(tiny_model, [("prune", {"target": {"num_layers": 2}})])


def test_iterative_skip_loss_drops_the_identity_layer_first(megatron_tp1, tmp_path):
    from nemo_quant.pruning.search import iterative_skip_scores

    loaded = _load(_tiny_with_dead_parts(tmp_path))
    scores = iterative_skip_scores(loaded.model, CALIB, keep=2)
    assert float(scores[2]) == 0 and sorted(scores.tolist()).count(4.0) == 2  # round 0: the identity layer
    apply_modes(loaded.model, [("prune", {"target": {"num_layers": 2}, "layer_score": "iterative_skip_loss"})])
    get_mode("prune").data_step(loaded.model, windows_forward_loop(CALIB))
    kept = mode_config(loaded.model, "prune").plan["layers"]
    assert kept == [i for i in range(4) if scores[i] == 4.0]


def test_a_hidden_size_transformers_refuses_is_warned_and_searches_avoid_it(megatron_tp1, tiny_model, capsys):
    from nemo_quant.modes import check_modes
    from nemo_quant.pruning.config import PruneConfig, PruneTarget
    from nemo_quant.pruning.search import sizes_within_budget

    check_modes(tiny_model, [("prune", {"target": {"hidden_size": 50, "num_attention_heads": 4}})])
    assert "hidden_size=50 with 4 heads: transformers' LlamaConfig refuses" in capsys.readouterr().out
    cfg = PruneConfig(target=PruneTarget(params=0.9 * TINY.parameter_count()))
    cfg.search.hidden_step, cfg.search.tolerance = 2, 0.2
    assert all(s.hidden_size % s.num_attention_heads == 0 for s, _ in sizes_within_budget(TINY, cfg, 1, 1))
    cfg.search.transformers_loadable = False
    assert any(s.hidden_size % s.num_attention_heads for s, _ in sizes_within_budget(TINY, cfg, 1, 1))
