"""Speculative-decoding draft heads (Medusa, EAGLE-3 / EAGLE-1, MTP) on a frozen Megatron base."""
