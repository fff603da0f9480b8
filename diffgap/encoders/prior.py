"""A pretrained language prior for the compact text tower: a token-embedding table and its tokenizer,
read from the files a PyPI wheel installs (no hub, no network). The other kind of prior, a frozen
sentence model, lives in diffgap/encoders/sentence.py; `prior_kind` tells them apart.

`wordllama` 0.4 (MIT) ships a 32,000 x 256 token-embedding table distilled from LLM embeddings
(`wordllama/weights/l2_supercat_256.safetensors`) and the matching `tokenizers` JSON (a Llama-2 BPE
with byte fallback, so any word splits into known pieces). WordLlama.load() fetches the tokenizer
from the hub and fails offline, so the files are read directly from the installed package.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer, normalizers

from diffgap.encoders.base import EncoderLoadError, file_sha256

# name -> (package, table file, tokenizer file), paths inside the installed package
PRIORS = {
    "wordllama-l2-supercat-256": (
        "wordllama",
        "weights/l2_supercat_256.safetensors",
        "tokenizers/l2_supercat_tokenizer_config.json",
    ),
}
DEFAULT_PRIOR = "wordllama-l2-supercat-256"
# What a text tower can do with each kind of prior (diffgap/models/text_net.py explains the modes).
# The first mode is the default: for a sentence model "beside", the only mode that kept the trained
# style's accuracy (it gained there) while it doubled R@1 on an unseen phrasing (BENCHMARKS.md).
PRIOR_MODES = {
    "table": ("frozen", "finetune", "pooled"),
    "sentence": ("beside", "tokens", "residual", "pooled", "dual"),
}


def prior_kind(name: str) -> str:
    """ "table" for a token-embedding table (PRIORS), "sentence" for a sentence model (a known name or a
    model directory, diffgap/encoders/sentence.py)."""
    return "table" if name in PRIORS else "sentence"


def check_prior_mode(name: str, mode: str) -> None:
    modes = PRIOR_MODES[prior_kind(name)]
    if mode not in modes:
        raise ValueError(
            f"prior {name!r} is a {prior_kind(name)} prior: its modes are {', '.join(modes)}, not {mode!r}"
        )


@dataclass(frozen=True)
class LanguagePrior:
    name: str
    table: np.ndarray  # (V, D) float32 token embeddings
    tokenizer_json: str  # the prior's tokenizer, lower-casing added (captions vary in case)
    sha256: str  # of the table file: recorded in the encoder's fingerprint

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.tokenizer_json)


@functools.lru_cache(maxsize=2)
def load_prior(name: str = DEFAULT_PRIOR) -> LanguagePrior:
    if name not in PRIORS:
        raise EncoderLoadError(f"unknown language prior {name!r}; known: {', '.join(PRIORS)}")
    package, table_file, tokenizer_file = PRIORS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EncoderLoadError(
            f"the language prior {name!r} comes from the {package!r} package, which is not installed: "
            f"pip install 'diffgap[prior]' (or pip install {package})"
        )
    root = Path(spec.origin).parent
    table_path, tokenizer_path = root / table_file, root / tokenizer_file
    try:
        tensors = load_file(str(table_path))
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # safetensors and tokenizers raise their own exception types
        raise EncoderLoadError(f"{package!r} has no readable {table_file} or {tokenizer_file}: {exc}") from exc
    (table,) = tensors.values()
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), tokenizer.normalizer])
    digest = file_sha256(table_path)
    return LanguagePrior(name, np.ascontiguousarray(table, dtype=np.float32), tokenizer.to_str(), digest)
