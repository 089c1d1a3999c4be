"""nemo_quant in a foreign Hydra job: the `nemo_quant` group's schemas and the Lightning
callback factory that makes a composed `+nemo_quant=...` act.

The composed node: `nemo_quant` is the quantization preset, with the optional sub-groups
`nemo_quant.qlora` and `nemo_quant.export` and the knobs `calib_batches` and `vocab_size`:

    python train.py +nemo_quant=fp8 +nemo_quant.calib_batches=8
    python train.py +nemo_quant/qlora=nf4
    python train.py +nemo_quant=int4_awq +nemo_quant/export=hf +nemo_quant.export.path=out +nemo_quant.vocab_size=49152

Lightning calls every `lightning.pytorch.callbacks_factory` entry point for each `Trainer()`;
ours (`callbacks`) reads the running Hydra job's config and returns a NemoQuantCallback when it
holds `nemo_quant`, nothing otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from nemo_quant.config.validate import ConfigError
from nemo_quant.export.config import ExportConfig
from nemo_quant.qlora.config import QLoRAConfig
from nemo_quant.quantization.config import QuantConfig

GROUP = "nemo_quant"


@dataclass
class ForeignQuantConfig(QuantConfig):
    """The quantization preset plus what the foreign job needs around it."""
    qlora: Optional[QLoRAConfig] = None
    export: Optional[ExportConfig] = None
    calib_batches: int = 16
    vocab_size: Optional[int] = None  # the unpadded vocabulary; needed with export


# Group -> schema; the group files come from conf/<group> (setup.py's FOREIGN_GROUPS).
FOREIGN_SCHEMAS = {GROUP: ForeignQuantConfig, f"{GROUP}/qlora": QLoRAConfig, f"{GROUP}/export": ExportConfig}
_WRAPPER_KEYS = ("qlora", "export", "calib_batches", "vocab_size")


def register_foreign_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    for group, schema in FOREIGN_SCHEMAS.items():
        ConfigStore.instance().store(group=group, name="schema", node=schema)


def running_job_config() -> DictConfig | None:
    """The whole composed config of the Hydra job this process runs, or None outside one.

    Hydra keeps only the `hydra` node in HydraConfig, parented to the composed job config."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get()._get_parent()


def callback_from_config(node: Any):
    """A NemoQuantCallback for the composed `nemo_quant` node; a clear error for what cannot act."""
    from nemo_quant.integrations.lightning import NemoQuantCallback

    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{GROUP}={node!r} reached the job as a plain value, not as a nemo_quant preset: Hydra did not "
            f"find the nemo_quant search-path plugin. Hydra finds plugins by listing the folders of the "
            f"`hydra_plugins` namespace, which an editable install (`pip install -e`) does not populate: install "
            f"nemo_quant regularly (`pip install <path or wheel>`) in the job's environment.")
    plain = OmegaConf.to_container(node, resolve=True)
    wrapper = {k: plain.pop(k, None) for k in _WRAPPER_KEYS}
    quant = plain or None  # only sub-groups or knobs given: no quantization
    if quant is not None and wrapper["qlora"] is not None:
        raise ConfigError(f"{GROUP}: a quantization preset and {GROUP}/qlora together; QLoRA quantizes its own "
                          f"base (NF4). Drop `+{GROUP}=...` or `+{GROUP}/qlora=...`.")
    if quant is None and wrapper["qlora"] is None:
        raise ConfigError(f"{GROUP} holds no mode: add `+{GROUP}=<quant preset>` or `+{GROUP}/qlora=<preset>`.")
    knobs = {k: wrapper[k] for k in ("calib_batches", "vocab_size") if wrapper[k] is not None}
    return NemoQuantCallback(quant=quant, qlora=wrapper["qlora"], export=wrapper["export"], **knobs)


def callbacks() -> list:
    """Lightning's callbacks_factory entry point: [NemoQuantCallback] inside a Hydra job that
    composed `nemo_quant`, [] everywhere else."""
    cfg = running_job_config()
    if cfg is None or cfg.get(GROUP) is None:
        return []
    return [callback_from_config(cfg[GROUP])]
