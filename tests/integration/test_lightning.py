"""NemoQuantCallback with a real lightning.Trainer around a Megatron GPTModel (CPU)."""
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from nemo_quant.integrations.lightning import CHECKPOINT_KEY
from nemo_quant.modes import mode_state
from nemo_quant.quantization.modules import quantizers
from tests.quant_helpers import W4A8_KV, logits

CALLBACK = {"_target_": "nemo_quant.integrations.lightning.NemoQuantCallback", "quant": W4A8_KV, "calib_batches": 2}


class TinyGPT(LightningModule):
    def __init__(self):
        super().__init__()
        from nemo_quant.models.builder import build_gpt_model
        from tests.tiny_models import TINY

        torch.manual_seed(0)
        self.gpt = build_gpt_model(TINY)

    def training_step(self, batch, _):
        tokens, labels = batch[:, :-1], batch[:, 1:]
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self.gpt(tokens, pos, None, labels=labels).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _data():
    windows = torch.arange(64).repeat(8)[: 8 * 17].reshape(8, 17) % 257
    return DataLoader(windows, batch_size=2)


def _trainer(tmp_path, steps, callback):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    return Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   callbacks=[instantiate(callback), ckpt], default_root_dir=tmp_path), ckpt


def test_callback_quantizes_calibrates_saves_and_resumes(megatron_tp1, tmp_path):
    from nemo_quant.export.reload import load_quantized_hf
    from nemo_quant.export.validate import validate_checkpoint

    module = TinyGPT()
    deploy = tmp_path / "deploy"
    export = {"format": "both", "path": str(deploy), "dtype": "float32"}
    trainer, ckpt = _trainer(tmp_path, 4, {**CALLBACK, "export": export, "vocab_size": 257})
    trainer.fit(module, _data())
    # on_fit_end exported the trained QAT model; the HF checkpoint reproduces it
    assert validate_checkpoint(deploy / "hf").ok and validate_checkpoint(deploy / "trtllm").ok
    rebuilt, _ = load_quantized_hf(deploy / "hf")
    probe = torch.arange(16).reshape(1, 16)
    torch.testing.assert_close(logits(rebuilt, probe), logits(module.gpt, probe), rtol=1e-6, atol=1e-6)
    assert type(module.gpt.decoder.layers[0].mlp.linear_fc1).__name__ == "QuantColumnParallelLinear"
    amax = {n: q.amax.clone() for n, q in quantizers(module.gpt)}
    assert all(not torch.isnan(a).any() for a in amax.values())

    path = ckpt.best_model_path or sorted(tmp_path.glob("*.ckpt"))[-1]
    saved = torch.load(path, weights_only=True)
    assert saved[CHECKPOINT_KEY] == mode_state(module.gpt)

    resumed = TinyGPT()  # fresh weights; everything must come back from the checkpoint
    trainer2, _ = _trainer(tmp_path / "resume", 6, CALLBACK)
    trainer2.fit(resumed, _data(), ckpt_path=str(path))
    assert trainer2.global_step == 6
    for name, q in quantizers(resumed.gpt):
        assert torch.equal(q.amax, amax[name]), name  # restored, not re-calibrated, and frozen

    # the last checkpoint, loaded for inference into a fresh module, reproduces the trained model
    check = TinyGPT()
    instantiate(CALLBACK).setup(None, check, "validate")
    check.load_state_dict(saved["state_dict"])
    assert all(q.is_calibrated for _, q in quantizers(check.gpt))
    batch = torch.arange(16).reshape(1, 16)
    assert torch.equal(logits(check.gpt, batch), logits(module.gpt, batch))


def test_resume_with_different_modes_is_refused(megatron_tp1, tmp_path):
    trainer, _ = _trainer(tmp_path, 2, CALLBACK)
    trainer.fit(TinyGPT(), _data())
    other = {**CALLBACK, "quant": {**W4A8_KV, "weight": {"format": "int8", "granularity": "channel"}}}
    trainer2, _ = _trainer(tmp_path / "b", 4, other)
    with pytest.raises(RuntimeError, match="differ from the configured ones"):
        trainer2.fit(TinyGPT(), _data(), ckpt_path=str(sorted(tmp_path.glob("*.ckpt"))[-1]))
