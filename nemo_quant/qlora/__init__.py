"""QLoRA: a frozen NF4 (bitsandbytes-exact, double-quantized) base under tensor parallelism,
trainable LoRA adapters, and exports for bitsandbytes, PEFT and the engines."""
