"""A plain @hydra.main Lightning training script around a Megatron GPTModel, as a user writes
one; it imports nothing of nemo_quant's Hydra integration. It records what the job did."""
import json

import hydra
import torch
from lightning.pytorch import LightningModule, Trainer
from omegaconf import DictConfig
from torch.utils.data import DataLoader


class Module(LightningModule):
    def __init__(self, cfg: DictConfig):
        super().__init__()
        if cfg.megatron:
            from nemo_quant.models.arch import LlamaArch
            from nemo_quant.models.builder import build_gpt_model

            arch = LlamaArch(**cfg.model, max_position_embeddings=64, rotary_base=10000.0, norm_eps=1e-5,
                             tie_word_embeddings=True)
            torch.manual_seed(0)
            self.gpt = build_gpt_model(arch)
        else:
            self.gpt = torch.nn.Embedding(cfg.model.vocab_size, cfg.model.hidden_size)
        self.losses = []

    def training_step(self, batch, _):
        tokens, labels = batch[:, :-1], batch[:, 1:]
        loss = self.gpt(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=labels).mean()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(1, 1))
    module = Module(cfg)
    module.lr = cfg.trainer.lr
    n = cfg.trainer.batch_size * cfg.trainer.max_steps
    data = torch.randint(0, cfg.model.vocab_size, (n, cfg.trainer.seq_length + 1), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(max_steps=cfg.trainer.max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=cfg.trainer.batch_size))
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    amax = [m.amax for m in module.modules() if type(m).__name__ == "TensorQuantizer"]
    with open(cfg.result, "w") as f:
        json.dump({"callbacks": [type(c).__name__ for c in trainer.callbacks],
                   "modules": sorted({type(m).__name__ for m in module.modules()}),
                   "trainable": sorted(trainable),
                   "with_grad": sorted(n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0),
                   "frozen": sorted(n for n, p in module.named_parameters() if not p.requires_grad),
                   "quantizers": len(amax), "calibrated": sum(bool(torch.isfinite(a).all()) for a in amax),
                   "losses": module.losses}, f)


if __name__ == "__main__":
    main()
