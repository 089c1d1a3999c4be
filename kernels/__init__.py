"""Fake-quant kernels (installed as `nemo_quant.kernels`).

`cpu/fake_quant.cpp` (C++, built just in time by `cpu_ops`) and `triton_ops` (Triton, CUDA
GPUs) implement the formats of `nemo_quant.numerics` in one pass over memory each; the
pure-torch functions there are the reference every kernel is tested against bit for bit.
`nemo_quant.quantization.kernel_dispatch` picks a backend once per device type.
"""
