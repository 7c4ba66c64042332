"""kiln.data: sources -> tokenizer -> indexed token files -> loader.

Importing this package is cheap; megatron-core and torch load with the loader, `datasets`
only for file or hub sources.
"""

from .config import DataConfig
from .errors import DataError
from .prepare import Prepared, prepare
from .tokenizer import SpecialIds, load_tokenizer

__all__ = ["DataConfig", "DataError", "Prepared", "prepare", "SpecialIds", "load_tokenizer",
           "ChunkLoader", "build_loader"]


def __getattr__(name):
    if name in ("ChunkLoader", "build_loader"):  # imports torch and megatron-core
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
