"""Register qdtk's transformers quantizer when transformers is imported, not before.

`import qdtk` must stay light (no torch), yet `AutoModel*.from_pretrained(PACKED)` must find
quant_method "qdtk" whether transformers was imported before or after qdtk: if it already is,
register now; else a one-shot import hook registers right after transformers' own import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def _register() -> None:
    try:
        from qdtk.torch.nn.hf import register_transformers

        register_transformers()
    except Exception as e:  # a broken transformers install must not break qdtk or transformers
        log.warning("qdtk could not register its transformers quantizer: %s", e)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of `transformers` to register afterwards."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # this module's loader instance only
        return spec


def register_when_imported() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
