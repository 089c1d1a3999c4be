"""2:4 sparsity: patterns, the three one-shot methods on layers with a known answer, the mode on
a tiny model (masks kept through training, composed with quantization), and bad input."""
import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import ModeError, apply_modes
from nemo_quant.numerics.obs_sweep import damped_hessian
from nemo_quant.quantization.forward_loop import windows_forward_loop
from nemo_quant.sparsity import solvers, sparsify
from nemo_quant.sparsity.config import AdmmConfig
from nemo_quant.sparsity.modules import sparse_layers
from nemo_quant.sparsity.patterns import nm_mask, pattern_violations
from tests.quant_helpers import FP8_KV, INT8_SQ, logits, tokens, w4a8_awq

CALIB, EVALS = tokens(10, 4, 16), tokens(11, 2, 16)


def _sorted_reference(scores, n, m):
    rows, cols = scores.shape
    order = torch.sort(scores.reshape(rows, -1, m), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (6, 8)])
def test_nm_mask_matches_a_stable_sort_ties_included(n, m):
    g = torch.Generator().manual_seed(n * m)
    for scores in (torch.randn(30, 64, generator=g), torch.randint(0, 3, (30, 64), generator=g).float()):
        mask = nm_mask(scores, n, m)
        assert torch.equal(mask, _sorted_reference(scores, n, m))
        assert (mask.reshape(30, -1, m).sum(-1) == n).all()


def test_pattern_violations_counts_overfull_groups():
    w = torch.tensor([[1.0, 0, 2, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert pattern_violations(w, 2, 4) == 1
    assert pattern_violations(w, 3, 4) == 0


def _layer(seed: int, rows: int = 24, cols: int = 48, tokens_: int = 400):
    """Correlated inputs (what makes reconstruction matter) and a dense weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens_, cols, generator=g) @ mix * torch.rand(cols, generator=g).add(0.2)
    return torch.randn(rows, cols, generator=g), x.T @ x


def test_methods_on_an_already_sparse_layer_keep_it_exactly():
    w0, h = _layer(0)
    w0 = w0 * nm_mask(torch.rand(w0.shape, generator=torch.Generator().manual_seed(1)), 2, 4)
    for w, mask in (solvers.magnitude(w0, 2, 4), solvers.sparsegpt(w0, h, 2, 4, 0.01, 16),
                    solvers.admm(w0, h, 2, 4, 0.01, 16, AdmmConfig())):
        assert torch.equal(mask, w0 != 0)
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_reconstruction_beats_mask_only_and_magnitude_and_admm_beats_sparsegpt(seed):
    w0, h = _layer(seed)
    err = lambda w: solvers.layer_error(w, w0, h)  # noqa: E731
    magnitude, _ = solvers.magnitude(w0, 2, 4)
    sparsegpt, mask = solvers.sparsegpt(w0, h, 2, 4, 0.01, 16)
    admm, admm_mask = solvers.admm(w0, h, 2, 4, 0.01, 16, AdmmConfig())
    assert err(sparsegpt) < err(w0 * mask) < err(magnitude)  # the kept weight update is what makes SparseGPT
    assert err(admm) < 0.97 * err(sparsegpt)
    assert pattern_violations(admm, 2, 4) == 0 and torch.equal(admm != 0, admm_mask & (admm != 0))


def test_refit_is_the_least_squares_solution_on_the_support():
    w0, h = _layer(3, rows=6)
    _, hd = damped_hessian(w0, h, 0.01)
    mask = nm_mask(w0.abs(), 2, 4)
    w = solvers.refit_on_support(w0, hd.float(), mask, w0 * mask, iterations=60)
    for r in range(w0.shape[0]):
        s = mask[r]
        exact = torch.linalg.solve(hd[s][:, s], (w0[r].double() @ hd)[s])
        torch.testing.assert_close(w[r, s].double(), exact, rtol=1e-3, atol=1e-4)
        assert (w[r, ~s] == 0).all()


def _sparse_model(tiny_model, method="sparsegpt", **cfg):
    apply_modes(tiny_model, [("sparsity", {"method": method, **cfg})])
    sparsify(tiny_model, windows_forward_loop(CALIB))
    return tiny_model


@pytest.mark.parametrize("method,n,m", [("magnitude", 2, 4), ("sparsegpt", 2, 4), ("admm", 2, 4), ("admm", 4, 8)])
def test_every_group_keeps_at_most_n(tiny_model, method, n, m):
    model = _sparse_model(tiny_model, method, n=n, m=m)
    layers = sparse_layers(model)
    assert len(layers) == 16 and not hasattr(model.output_layer, "sparse_mask")  # tied output layer stays dense
    for name, module in layers:
        assert pattern_violations(module.weight, n, m) == 0, name
        assert torch.equal(module.weight != 0, module.sparse_mask & (module.weight != 0))
        assert (module.sparse_mask.reshape(module.weight.shape[0], -1, m).sum(-1) == n).all()


def test_data_methods_refuse_without_data(tiny_model):
    from nemo_quant.quantization.forward_loop import CalibrationError

    apply_modes(tiny_model, [("sparsity", {"method": "admm"})])
    with pytest.raises(CalibrationError, match="needs calibration data"):
        sparsify(tiny_model)


def test_masked_weights_stay_zero_through_adamw(tiny_model):
    model = _sparse_model(tiny_model, "magnitude")
    model.train()
    before = {n: m.weight.detach().clone() for n, m in sparse_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batch = tokens(5, 2, 17)
    for _ in range(3):
        opt.zero_grad()
        positions = torch.arange(16).unsqueeze(0).expand(2, 16)
        model(batch[:, :-1], positions, None, labels=batch[:, 1:]).float().mean().backward()
        opt.step()
    for name, module in sparse_layers(model):
        assert (module.weight[~module.sparse_mask] == 0).all(), name
        assert not torch.equal(module.weight, before[name]), name  # the kept weights did train


@pytest.mark.parametrize("quant", [FP8_KV, INT8_SQ, w4a8_awq(16), {**FP8_KV, "name": "fp8_gptq", "gptq": {"enabled": True}}],
                         ids=["fp8", "int8_sq", "w4a8_awq", "fp8_gptq"])
def test_quantization_keeps_the_zeros(tiny_model, quant):
    from nemo_quant.quantization.calibrate import calibrate

    model = _sparse_model(tiny_model, "sparsegpt")
    apply_modes(model, [("quantize", quant)])
    calibrate(model, windows_forward_loop(CALIB))
    for name, module in sparse_layers(model):
        _, w = module.gemm_operands(torch.zeros(1, module.weight.shape[1]), module.weight)
        assert (w[~module.sparse_mask] == 0).all(), name
        assert pattern_violations(w, 2, 4) == 0
    assert torch.isfinite(logits(model, EVALS)).all()


def test_quantize_then_sparsify_is_refused(tiny_model):
    apply_modes(tiny_model, [("quantize", FP8_KV)])
    with pytest.raises(ModeError, match="'sparsity' cannot be applied after 'quantize'"):
        apply_modes(tiny_model, [("sparsity", {})])


@pytest.mark.parametrize("cfg,match", [
    ({"m": 6, "n": 3, "block_size": 120}, r"sparsity.m=6 does not divide the input dim 64"),
    ({"n": 4, "m": 4}, r"sparsity.n=4: must be between 1"),
    ({"exclude": ["output_layer", "decoder.layers.*.mlp.linear_fc9"]}, r"sparsity.exclude\[1\].*matches no linear"),
    ({"exclude": []}, r"output_layer.*tied.*sparsity.exclude"),
    ({"block_size": 6}, r"sparsity.block_size=6"),
])
def test_bad_config_fails_before_any_change(tiny_model, cfg, match):
    from nemo_quant.preflight import PreflightError, preflight

    weights = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with pytest.raises((ConfigError, PreflightError), match=match):
        preflight(tiny_model, None, [("sparsity", cfg)])
    assert not sparse_layers(tiny_model)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_model.named_parameters())


def test_export_refuses_masks_never_chosen_and_revived_weights(tiny_model, tmp_path):
    from nemo_quant.export.formats import ExportError
    from nemo_quant.export.writer import export_checkpoint
    from tests.tiny_models import TINY

    apply_modes(tiny_model, [("sparsity", {"method": "magnitude"})])
    with pytest.raises(ExportError, match="masks were never chosen"):
        export_checkpoint(tiny_model, TINY, {"format": "hf", "path": str(tmp_path / "a")})
    sparsify(tiny_model)
    layer = tiny_model.decoder.layers[1].mlp.linear_fc2
    with torch.no_grad():
        layer.weight[~layer.sparse_mask] += 1.0
    with pytest.raises(ExportError, match="nonzero where its sparsity mask is 0"):
        export_checkpoint(tiny_model, TINY, {"format": "hf", "path": str(tmp_path / "b")})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
