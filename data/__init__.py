"""kiln.data: sources -> tokenizer -> indexed token files -> loader.

Importing this package is cheap; torch loads with the loader, `datasets` only for file or hub
sources. megatron-core is the format's reference (tests read kiln's files with it); kiln reads
and writes the format with numpy, which spares every process its 5-10 s import.
"""

from .config import DataConfig
from .errors import DataError
from .prepare import Prepared, prepare
from .tokenizer import SpecialIds, load_tokenizer

__all__ = ["DataConfig", "DataError", "Prepared", "prepare", "SpecialIds", "load_tokenizer",
           "ChunkLoader", "build_loader"]


def __getattr__(name):
    if name in ("ChunkLoader", "build_loader"):  # imports torch
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
