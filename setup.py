"""nemo_quant: model optimization (quantization, QLoRA, sparsity, pruning, speculative heads,
export) for Megatron-core / NeMo GPT training jobs."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def yaml_files(folder: str) -> list[str]:
    return [str(p.relative_to(ROOT / folder)) for p in (ROOT / folder).rglob("*.yaml")]


# Foreign Hydra apps: the search-path plugin installs as hydra_plugins.nemo_quant_searchpath, its
# search-path root, which holds the groups `nemo_quant` (the quantization presets) and
# `nemo_quant/<group>` (nemo_quant/integrations/hydra_job.py has their schemas).
PLUGIN = "hydra_plugins.nemo_quant_searchpath"
FOREIGN_GROUPS = {"nemo_quant": "conf/quant", "nemo_quant.qlora": "conf/qlora", "nemo_quant.export": "conf/export"}


setup(
    name="nemo_quant",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    # conf/ and kernels/ live at the top level of the repository and install inside the package.
    packages=find_packages(include=["nemo_quant", "nemo_quant.*"], exclude=["nemo_quant.integrations.hydra_searchpath"])
    + ["nemo_quant.conf", "nemo_quant.kernels", PLUGIN] + [f"{PLUGIN}.{g}" for g in FOREIGN_GROUPS],
    package_dir={"nemo_quant.conf": "conf", "nemo_quant.kernels": "kernels",
                 PLUGIN: "nemo_quant/integrations/hydra_searchpath",
                 **{f"{PLUGIN}.{g}": folder for g, folder in FOREIGN_GROUPS.items()}},
    package_data={"nemo_quant.conf": yaml_files("conf"), "nemo_quant.kernels": ["cpu/*.cpp"],
                  **{f"{PLUGIN}.{g}": yaml_files(folder) for g, folder in FOREIGN_GROUPS.items()}},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "psutil",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "gguf>=0.10",
        "tqdm>=4.66",
        "numpy",
        "ninja>=1.11",  # just-in-time build of the C++ CPU kernels
    ],
    extras_require={
        "lightning": ["lightning>=2.4,<2.5"],
        # transformers: an independent consumer of the unified HF export in the tests.
        # triton: its interpreter runs the GPU kernels' code on CPU in the tests.
        # compressed-tensors: its own decompressor reads our compressed-tensors export in the tests.
        # bitsandbytes + peft: the oracle of our NF4 bytes and the consumers of the QLoRA exports.
        "test": ["pytest>=8", "lightning>=2.4,<2.5", "transformers>=4.56", "triton>=3.4,<4", "compressed-tensors",
                 "bitsandbytes", "peft"],
        # GPU-only; never installed in CI (transformer-engine cannot import without CUDA).
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["nemo-quant=nemo_quant.cli.main:main",
                                      "nemo-quant-slurm=nemo_quant.integrations.slurm:main"],
                  # `+nemo_quant=...` composed into a Hydra job acts through this callback factory.
                  "lightning.pytorch.callbacks_factory": ["nemo_quant=nemo_quant.integrations.hydra_job:callbacks"]},
)
