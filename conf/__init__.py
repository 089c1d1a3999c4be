"""Hydra config tree of nemo_quant, importable as `nemo_quant.conf` once installed."""
