"""Loading transformers checkpoints from a hub id or a local directory, offline-aware."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from diffgap.encoders.base import EncoderLoadError

T = TypeVar("T")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def load_pretrained(loader: Callable[..., T], model_id: str, what: str) -> T:
    """Call `loader(model_id)`; turn a missing-weights failure into advice the user can act on."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars and logs are enough
    local = Path(model_id).expanduser()
    if local.exists():
        source: str | Path = local
    elif model_id.startswith((".", "/", "~")):
        raise EncoderLoadError(f"{what}: directory {model_id!r} does not exist")
    else:
        source = model_id
    try:
        return loader(source, local_files_only=is_offline() or isinstance(source, Path))
    except (OSError, ValueError) as exc:
        raise EncoderLoadError(
            f"{what}: cannot load {model_id!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Provide the weights one of two ways: run `huggingface-cli download "
            f"{model_id}` on a machine with network access and copy its cache (HF_HOME, default "
            "~/.cache/huggingface) here, or save the model with save_pretrained() into a directory and "
            "pass that directory instead of the hub id. HF_HUB_OFFLINE=1 forbids downloads."
        ) from exc
