"""Knowledge distillation as a training objective (`nemo-quant train distill=...`): a frozen
teacher, forward KL on vocab-parallel logits, optional intermediate-layer pairs; QAD is a
quantized student trained with it."""
