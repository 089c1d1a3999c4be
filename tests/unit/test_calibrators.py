"""Percentile and MSE calibrators on data whose answer is known."""
import pytest
import torch

from nemo_quant.quantization.calibrators import MaxCalibrator, PercentileCalibrator
from nemo_quant.quantization.config import QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant, fake_quant_ste
from nemo_quant.quantization.tensor_quantizer import TensorQuantizer


def _heavy_tailed(seed=0, n=200_000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:10] = 80.0  # a few outliers
    return x


def test_max_calibrator_running_max():
    c = MaxCalibrator(lambda x: x.abs().amax())
    c.collect(torch.tensor([1.0, -3.0]))
    c.collect(torch.tensor([2.0]))
    assert c.compute_amax().item() == 3.0


def test_percentile_ignores_outliers():
    c = PercentileCalibrator(99.9)
    x = _heavy_tailed()
    for chunk in x.split(50_000):
        c.collect(chunk)
    expected = torch.quantile(x.abs()[:100_000], 0.999).item()
    assert c.compute_amax().item() == pytest.approx(expected, rel=0.05)
    assert c.compute_amax().item() < 10


def test_percentile_rebins_when_range_grows():
    c = PercentileCalibrator(100.0)
    c.collect(torch.full((100,), 0.5))
    c.collect(torch.tensor([4.0]))
    assert c.compute_amax().item() == pytest.approx(4.0, rel=1e-3)


def test_mse_beats_max_on_heavy_tails():
    spec = QuantizerSpec(format="int4", granularity="tensor", calibrator="mse")
    q = TensorQuantizer(spec, "input")
    x = _heavy_tailed()
    q.start_calibration()
    q.collect(x)
    amax = q.local_amax()
    assert amax < x.abs().max()
    err = lambda a: (fake_quant(x, spec, a) - x).pow(2).sum()
    assert err(amax) < err(x.abs().max())


def test_mse_per_channel_weights():
    spec = QuantizerSpec(format="int4", granularity="channel", calibrator="mse")
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    q = TensorQuantizer(spec, "weight", tuple(w.shape))
    q.start_calibration()
    q.collect(w)
    amax = q.local_amax()
    assert amax.shape == (8, 1)
    per_row = lambda a: (fake_quant(w, spec, a) - w).pow(2).sum(1)
    assert torch.all(per_row(amax) <= per_row(w.abs().amax(1, keepdim=True)) + 1e-6)


def test_clipped_ste_zeroes_gradient_outside_range():
    spec = QuantizerSpec(format="int8", granularity="tensor", ste="clipped")
    x = torch.tensor([0.5, 2.0, -3.0], requires_grad=True)
    fake_quant_ste(x, spec, torch.tensor(1.0)).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("calibrator", ["max", "mse"])
def test_global_blocks_on_a_column_slice_match_the_full_weight(calibrator):
    """A row-parallel rank's slice, blocked over global columns, reproduces the TP=1 result."""
    spec = QuantizerSpec(format="int4", granularity="block", block_size=32, calibrator=calibrator)
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    full = TensorQuantizer(spec, "weight", (6, 96))
    full.start_calibration()
    full.collect(w)
    full.set_amax(full.local_amax())
    halves = []
    for rank in range(2):
        q = TensorQuantizer(spec, "weight", (6, 48))
        q.use_global_blocks(48 * rank, 96)
        assert q.amax.shape == (6, 3)
        halves.append(q)
    partial = [q.reduce_amax(w[:, 48 * r:48 * (r + 1)]) for r, q in enumerate(halves)]
    if calibrator == "max":
        torch.testing.assert_close(torch.maximum(*partial), full.amax, rtol=0, atol=0)
    for r, q in enumerate(halves):
        q.set_amax(full.amax)
        assert torch.equal(q(w[:, 48 * r:48 * (r + 1)]), full(w)[:, 48 * r:48 * (r + 1)])


def test_batch_percentile_ignores_one_outlier_batch():
    from nemo_quant.quantization.calibrators import BatchPercentileCalibrator

    c = BatchPercentileCalibrator(lambda x: x.abs().amax(), 90.0, None, lambda t: t)
    peaks = [float(i) for i in range(1, 101)]
    peaks[37] = 1e4  # one batch with a huge activation
    for p in peaks:
        c.collect(torch.tensor([p, -0.5 * p]))
    expected = torch.quantile(torch.tensor(peaks), 0.9).item()
    assert c.compute_amax().item() == pytest.approx(expected) and expected < 100


@pytest.mark.distributed
def test_batch_percentile_pools_data_parallel_ranks():
    from nemo_quant.runtime.spawn import run_distributed
    from tests import workers

    shards = [[1.0, 2.0, 50.0], [3.0, 4.0]]  # DP ranks see different numbers of batches
    amax = run_distributed(workers.batch_percentile_amax, 2, shards, 50.0, timeout_s=120)
    expected = torch.quantile(torch.tensor([1.0, 2.0, 50.0, 3.0, 4.0]), 0.5).item()
    assert amax == [pytest.approx(expected)] * 2
