"""The slow tier: every routed expert of a model, outside the fast tier.

CPU: one safetensors file, memory-mapped; an expert is read by slicing its rows out of the map,
so resident memory holds only what the cache copied in. CUDA: pinned host tensors, copied to the
device with non_blocking on a side stream. Keys are `l{j}.w1|w3|w2` for the j-th MoE layer,
each [E, ...], exactly the bank rows of kiln.model.moe.SwiGLUExperts.
"""
import contextlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.model.moe import MoE

WEIGHTS = ("w1", "w3", "w2")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors names


def moe_blocks(model) -> list:
    """The model's MoE blocks in layer order."""
    return [blk.mlp for blk in model.layers if isinstance(blk.mlp, MoE)]


class ExpertStore:
    """All experts of every MoE layer in the slow tier (see the module doc)."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = Path(path), torch.device(device)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        keys = set(self._file.keys())
        self.layers = sum(1 for k in keys if k.endswith(".w1"))
        self.shapes = {w: tuple(self._file.get_slice(f"l0.{w}").get_shape()) for w in WEIGHTS}
        self.experts = self.shapes["w1"][0]
        self.dtype = _DTYPES.get(self._file.get_slice("l0.w1").get_dtype(), torch.float32)
        self._pinned = None
        if self.device.type == "cuda":  # host copies once, pinned, so copies can run async
            self._pinned = {(j, w): self._file.get_tensor(f"l{j}.{w}").pin_memory()
                            for j in range(self.layers) for w in WEIGHTS}
        self.bytes_per_expert = sum(
            int(torch.Size(s[1:]).numel()) for s in self.shapes.values()) * self.dtype.itemsize

    @classmethod
    def write(cls, model, path: Path) -> Path:
        """Write the routed experts of `model` to a safetensors file at `path`."""
        tensors = {f"l{j}.{w}": getattr(m.experts, w).detach().cpu().contiguous()
                   for j, m in enumerate(moe_blocks(model)) for w in WEIGHTS}
        if not tensors:
            raise ValueError("the model has no MoE layers: nothing to offload")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
        return path

    def read_into(self, layer: int, expert: int, dest: dict, slot: int, stream=None) -> None:
        """Copy expert `expert` of MoE layer `layer` into row `slot` of the fast-tier tensors `dest`."""
        for w in WEIGHTS:
            if self._pinned is not None:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    dest[w][slot].copy_(self._pinned[(layer, w)][expert], non_blocking=True)
            else:
                dest[w][slot].copy_(self._file.get_slice(f"l{layer}.{w}")[expert])

