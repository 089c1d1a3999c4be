"""The base class of the draft modules: their Megatron sharded state (reshardable checkpoints)."""
from __future__ import annotations

from megatron.core.transformer.module import MegatronModule


class DraftModule(MegatronModule):
    """Two fixes to Megatron's default sharded state for draft heads:
    - a ModuleList child is treated by the default as a plain module (every tensor replicated):
      the lists named in `module_lists` are recursed into, so their TP-sharded linears keep their axes;
    - vocab heads are padded to 128 x TP rows, so their global shape changes with the layout: they
      may be padded / truncated on load, as Megatron does for the base's output layer."""

    module_lists: tuple[str, ...] = ()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        if not self.module_lists:
            state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        else:
            state = {}
            for name, child in self.named_children():
                items = enumerate(child) if name in self.module_lists else [(None, child)]
                for i, item in items:
                    key = f"{prefix}{name}." if i is None else f"{prefix}{name}.{i}."
                    state.update(item.sharded_state_dict(key, sharded_offsets, metadata))
        for key, tensor in state.items():
            if key.endswith("lm_head.weight"):
                tensor.allow_shape_mismatch = True
        return state
