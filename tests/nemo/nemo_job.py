"""A NeMo 2.7.3 training job on CPU with NemoQuantTransform, as a user writes one (run in the NeMo
virtualenv by tests/nemo/test_nemo_transform.py; `make test-nemo`).

    python tests/nemo/nemo_job.py OUT_JSON LOG_DIR [--tp 2] [--steps 3] [--quant fp8 | --qlora nf4] [--resume CKPT]
Every rank appends one JSON line to OUT_JSON: its modes, quantizer scales and which weights got gradients.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.nemo import nemo_cpu  # noqa: E402  (before NeMo imports megatron's checkpoint strategies)

nemo_cpu.apply()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from nemo import lightning as nl  # noqa: E402
from nemo.collections import llm  # noqa: E402
from nemo.lightning.pytorch.plugins import MegatronDataSampler  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from nemo_quant.integrations.lightning import megatron_gpt_models  # noqa: E402
from nemo_quant.integrations.nemo import NemoQuantQLoRA, NemoQuantTransform  # noqa: E402
from nemo_quant.modes import mode_state  # noqa: E402
from nemo_quant.quantization.modules import quantizers  # noqa: E402

SEQ, VOCAB = 16, 256


class Windows(Dataset):
    def __init__(self, n: int):
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x = self.data[i]
        return {"tokens": x[:-1], "labels": x[1:], "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ),
                "attention_mask": torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None]}


class Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.seq_length, self.micro_batch_size, self.global_batch_size = SEQ, 1, 2
        self.data_sampler = MegatronDataSampler(seq_len=SEQ, micro_batch_size=1, global_batch_size=2)

    def train_dataloader(self):
        return DataLoader(Windows(64), batch_size=1)

    def val_dataloader(self):
        return DataLoader(Windows(4), batch_size=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out"), parser.add_argument("log_dir")
    parser.add_argument("--tp", type=int, default=1), parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quant", default="fp8"), parser.add_argument("--qlora"), parser.add_argument("--resume")
    parser.add_argument("--sparsity")
    args = parser.parse_args()
    config = llm.Llama32Config1B(
        num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, kv_channels=32,
        seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=128, params_dtype=torch.float32, bf16=False,
        use_cpu_initialization=True, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, cross_entropy_loss_fusion=False)
    model = llm.LlamaModel(config)
    trainer = nl.Trainer(accelerator="cpu", devices=args.tp, max_steps=args.steps, log_every_n_steps=1,
                         limit_val_batches=0, num_sanity_val_steps=0, val_check_interval=args.steps,
                         strategy=nl.MegatronStrategy(tensor_model_parallel_size=args.tp, ddp="megatron"))
    optim = nl.MegatronOptimizerModule(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=False,
                                                       clip_grad=0.0, bf16=False, fp16=False))
    resume = nl.AutoResume(resume_from_path=args.resume) if args.resume else None
    llm.train(model, Data(), trainer, log=nl.NeMoLogger(log_dir=args.log_dir), optim=optim, tokenizer=None,
              resume=resume, model_transform=NemoQuantQLoRA(args.qlora) if args.qlora
              else NemoQuantTransform(args.quant, calib_batches=2, sparsity=args.sparsity))
    gpt = megatron_gpt_models(trainer.model)[0]
    row = {"rank": torch.distributed.get_rank(), "modes": [m["name"] for m in mode_state(gpt)],
           "fc1": type(gpt.decoder.layers[0].mlp.linear_fc1).__name__,
           "amax": {n: q.amax.flatten().tolist() for n, q in quantizers(gpt)},
           # 2:4 masks: per group of 4 inputs how many weights are kept, and whether pruned ones stayed zero
           "kept_per_4": sorted({int(k) for m in gpt.modules() if hasattr(m, "sparse_mask")
                                 for k in m.sparse_mask.reshape(-1, 4).sum(-1).unique()}),
           "pruned_zero": all(bool((m.weight[~m.sparse_mask] == 0).all()) for m in gpt.modules()
                              if hasattr(m, "sparse_mask")),
           "weights": sorted(n for n, p in gpt.named_parameters() if p.requires_grad),
           "with_grad": sorted(n for n, p in gpt.named_parameters()
                               if getattr(p, "main_grad", None) is not None and float(p.main_grad.abs().sum()) > 0)}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
