"""Speculative-heads test helpers: a tiny base whose greedy continuations do not settle into a loop
(larger weights), a few training steps, and an independent draft runner written from the engines'
key mappings (vLLM's EAGLE-3 and Medusa), used to check the exports."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_models import TINY, tiny_hf_tensors, write_hf_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD_MODE = {"medusa": "medusa", "eagle3": "eagle", "eagle1": "eagle", "mtp": "mtp"}


def lively_tensors() -> dict[str, torch.Tensor]:
    t = tiny_hf_tensors(TINY)
    return {k: v * 8 if k.endswith(tuple(f"{p}.weight" for p in LINEARS)) else v for k, v in t.items()}


def write_lively(directory: Path) -> Path:
    return write_hf_checkpoint(directory, TINY, tensors=lively_tensors())


def spec_config(method: str, **extra) -> dict:
    cfg = {"name": method, "method": method, **extra}
    if method == "eagle3":
        cfg.setdefault("aux_layers", [0, 1, 2])
    return cfg


def train_heads(model, cfg: dict, sequences: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """Apply the heads (mode + data step on `sequences`) and train them a few steps on `sequences`."""
    from nemo_quant.modes import apply_modes, get_mode, mode_config
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.speculative.objective import SpeculativeObjective
    from nemo_quant.training.loop import forward_backward, make_optimizer

    name = METHOD_MODE[cfg["method"]]
    apply_modes(model, [(name, cfg)])
    get_mode(name).data_step(model, windows_forward_loop(sequences))
    objective = SpeculativeObjective(model, mode_config(model, name), TINY.vocab_size)
    optimizer = make_optimizer(model, lr, 0.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        losses.append(float(forward_backward(model, sequences, sequences.shape[0], objective)))
        optimizer.step()
    return losses


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, theta, dim):
    """HF Llama rotate-half RoPE on [heads, n, d] at `positions`."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions[:, None].double() * inv[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class ReferenceEagle3:
    """vLLM's EAGLE-3 draft, incrementally: the draft's KV cache holds the verified positions (true
    features) and the chain's own steps, each chain step one query at its position."""

    def __init__(self, directory: Path, base):
        from safetensors.torch import load_file

        self.cfg = json.loads((Path(directory) / "config.json").read_text())
        self.t = {k: v.float() for k, v in load_file(str(Path(directory) / "model.safetensors")).items()}
        self.base = base
        n = base.config.num_hidden_layers
        ids = self.cfg["eagle_config"].get("eagle_aux_hidden_state_layer_ids") or [1, n // 2 - 1, n - 4]
        self.aux = sorted(ids)  # output of layer k = hidden_states[k + 1]
        self.heads, self.groups = self.cfg["num_attention_heads"], self.cfg["num_key_value_heads"]
        self.d = self.cfg["head_dim"]

    def _layer(self, emb, hidden, positions, cache):
        t, c, p = self.t, self.cfg, "midlayer."
        eps = c["rms_norm_eps"]
        x = torch.cat([_rms(emb, t[p + "input_layernorm.weight"], eps), _rms(hidden, t[p + "hidden_norm.weight"], eps)], -1)
        q = (x @ t[p + "self_attn.q_proj.weight"].T).view(-1, self.heads, self.d).transpose(0, 1)
        k = (x @ t[p + "self_attn.k_proj.weight"].T).view(-1, self.groups, self.d).transpose(0, 1)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).view(-1, self.groups, self.d).transpose(0, 1)
        q, k = _rope(q, positions, c["rope_theta"], self.d), _rope(k, positions, c["rope_theta"], self.d)
        cache["k"] = torch.cat([cache["k"], k], 1) if "k" in cache else k
        cache["v"] = torch.cat([cache["v"], v], 1) if "v" in cache else v
        keys = cache["k"].repeat_interleave(self.heads // self.groups, 0)
        values = cache["v"].repeat_interleave(self.heads // self.groups, 0)
        scores = q @ keys.transpose(1, 2) / self.d ** 0.5
        total, new = keys.shape[1], q.shape[1]
        allowed = torch.arange(total)[None] <= (torch.arange(new)[:, None] + total - new)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values
        h = hidden + attn.transpose(0, 1).reshape(new, -1) @ t[p + "self_attn.o_proj.weight"].T
        y = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
        mlp = (torch.nn.functional.silu(y @ t[p + "mlp.gate_proj.weight"].T) * (y @ t[p + "mlp.up_proj.weight"].T))
        return h + mlp @ t[p + "mlp.down_proj.weight"].T

    def _token(self, prenorm):
        logits = _rms(prenorm, self.t["norm.weight"], self.cfg["rms_norm_eps"]) @ self.t["lm_head.weight"].T
        draft = int(logits.argmax(-1))
        return draft + int(self.t["d2t"][draft]) if "d2t" in self.t else draft

    def propose(self, seq: list[int], k: int) -> list[int]:
        """k drafts after the verified `seq` (its last token is the base's bonus token)."""
        n = len(seq) - 1
        tokens = torch.tensor(seq)
        with torch.no_grad():
            hs = self.base(tokens[None, :n], output_hidden_states=True).hidden_states
            feats = torch.cat([hs[a + 1][0] for a in self.aux], -1) @ self.t["fc.weight"].T
            embed = self.base.model.embed_tokens
            cache: dict = {}
            out = self._layer(embed(tokens[1:n + 1]), feats, torch.arange(n), cache)[-1:]
            drafts = [self._token(out)]
            for s in range(1, k):
                out = self._layer(embed(torch.tensor(drafts[-1:])), out, torch.tensor([n - 1 + s]), cache)
                drafts.append(self._token(out))
        return drafts


class ReferenceMedusa:
    """vLLM's MedusaModel: head i = residual blocks then its own lm_head, on the last hidden state."""

    def __init__(self, directory: Path, base):
        from safetensors.torch import load_file

        self.cfg = json.loads((Path(directory) / "config.json").read_text())
        self.t = {k: v.float() for k, v in load_file(str(Path(directory) / "model.safetensors")).items()}
        self.base = base

    def propose(self, seq: list[int], k: int) -> list[int]:
        n = len(seq) - 1
        with torch.no_grad():
            h = self.base(torch.tensor(seq)[None, :n], output_hidden_states=True).hidden_states[-1][0, -1]
        drafts = []
        for i in range(min(k, self.cfg["num_heads"])):
            y = h
            for j in range(self.cfg["num_hidden_layers"]):
                y = y + torch.nn.functional.silu(y @ self.t[f"blocks.{i}.layers.{j}.weight"].T + self.t[f"blocks.{i}.layers.{j}.bias"])
            drafts.append(int((y @ self.t[f"lm_heads.{i}.weight"].T).argmax()))
        return drafts


def reference_tau(base, proposer, prompts: torch.Tensor, total_len: int, k: int) -> tuple[float, list[torch.Tensor]]:
    """Greedy chain verification with an HF base and a reference proposer, counted as `replay` counts."""
    tokens = steps = 0
    sequences = []
    for prompt in prompts:
        with torch.no_grad():
            seq = prompt.tolist() + [int(base(prompt[None]).logits[0, -1].argmax())]
        while len(seq) - 1 + k + 1 <= total_len - 1:
            n = len(seq) - 1
            drafts = proposer.propose(seq, k)
            with torch.no_grad():
                verify = base(torch.tensor(seq + drafts)[None]).logits[0].argmax(-1)
            m = 0
            while m < k and drafts[m] == int(verify[n + m]):
                m += 1
            seq = seq + drafts[:m] + [int(verify[n + m])]
            tokens, steps = tokens + m + 1, steps + 1
        sequences.append(torch.tensor(seq))
    return tokens / steps, sequences


class TensorSource:
    """HF-named tensors in memory as a weight source (models/importer.py)."""

    def __init__(self, arch, tensors: dict[str, torch.Tensor]):
        self.arch, self.tensors = arch, tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def names(self) -> list[str]:
        return list(self.tensors)


def lively_model():
    """The lively tiny base as a Megatron GPTModel (this process's layout)."""
    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.models.importer import import_weights

    model = build_gpt_model(TINY)
    import_weights(model, TensorSource(TINY, lively_tensors()))
    return model


def preset(group: str, name: str) -> dict:
    """A shipped Hydra preset (conf/<group>/<name>.yaml) as a plain dict."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / group / f"{name}.yaml"))
    cfg.pop("defaults", None)
    return cfg
