"""n:m sparsity (2:4 by default): the `sparsity` mode and `sparsify`, which chooses the masks."""
from nemo_quant.sparsity.config import SparsityConfig, SparsityMethod
from nemo_quant.sparsity.one_shot import SparsifyReport, sparsify

__all__ = ["SparsityConfig", "SparsityMethod", "SparsifyReport", "sparsify"]
