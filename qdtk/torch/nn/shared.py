"""`Shared`: a module that runs another module of the same model.

transformers ties parameters by name (DiffusionGemma's encoder layers use its decoder's
weights); a packed module has buffers instead, which it does not tie. The tied copy of a packed
module becomes a Shared alias of it (qdtk.torch.nn.hf.share_tied). The other module is held
outside torch's registry of submodules, so its buffers appear once in the state_dict, under the
names the checkpoint stores, and move with it.
"""

from __future__ import annotations

from torch import nn


class Shared(nn.Module):
    def __init__(self, name: str, target: nn.Module):
        super().__init__()
        self.__dict__["target"] = target  # not a submodule: its tensors are listed once
        self.target_name = name

    def extra_repr(self) -> str:
        return f"runs {self.target_name}"

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)
