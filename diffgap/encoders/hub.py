"""Loading transformers checkpoints from a hub id or a local directory, offline-aware."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from diffgap.encoders.base import EncoderLoadError

T = TypeVar("T")


TRUE = {"1", "true", "yes", "on"}
DOWNLOAD_ENV = "DIFFGAP_DOWNLOAD"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE


def downloads_allowed() -> bool:
    """Weights come from the local cache only, unless the user opted in to downloads (`--download` or
    DIFFGAP_DOWNLOAD=1) and HF_HUB_OFFLINE does not forbid them: a machine without network would
    otherwise spend ~25 s on retries before saying the weights are missing."""
    return os.environ.get(DOWNLOAD_ENV, "").lower() in TRUE and not is_offline()


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
        return loader(source, local_files_only=not downloads_allowed() or isinstance(source, Path))
    except (OSError, ValueError) as exc:
        download = (
            f"with network access, add --download (or set {DOWNLOAD_ENV}=1) to fetch it from the hub; "
            if isinstance(source, str) and not is_offline()
            else ""
        )
        raise EncoderLoadError(
            f"{what}: cannot load {model_id!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            f"Provide the weights: {download}or run `huggingface-cli download {model_id}` on a machine with "
            "network access and copy its cache (HF_HOME, default ~/.cache/huggingface) here; or save the "
            "model with save_pretrained() into a directory and pass that directory instead of the hub id. "
            "HF_HUB_OFFLINE=1 forbids downloads."
        ) from exc
