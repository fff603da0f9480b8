"""A trained DiffGAP refiner: checkpoint I/O and the retrieval-time refinement of query vectors.

Two ways to turn a query embedding q into an audio-space vector (direction 0; direction 1 goes
from audio to the query space the same way):
- "sample" (the paper): z_N ~ N(0, I), DDIM down to z_0 conditioned on q. Made deterministic
  by a fixed seed per call and optionally averaged over `n_samples` draws.
- "bridge" (in the spirit of Diffusion Bridge): start from an estimate of the target noised to step
  `start_step` (noise from a fixed seed; `start_noise=0` uses no noise) and denoise, still
  conditioned on q. The estimate is the query itself (which needs the query and audio spaces to be
  one space: CLAP text/audio, compact) or any vectors given as `start`, e.g. a regression mapper's.
The result may be blended with the query (`blend` in [0, 1]) before search; for unit vectors
that equals blending the two cosine scores, so one FAISS search serves both. A refiner trained with
its mapper (`mix`) sums the refined, mapped and direct scores the same way, in one vector, and with
its text adapter (adapter.py) the adapter's reading of the query's words as a fourth part. With a
backward mapper (`library_weight`), each candidate's audio mapped into the query space and scored
against the raw query is a library-side part, added to the candidates the one search returns
(`two_sided_scores`).
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from diffgap.atomic import atomic_write_bytes, atomic_write_json
from diffgap.diffusion.adapter import AdapterError, TextAdapter
from diffgap.diffusion.schedule import DDIMSampler, NoiseSchedule, ScheduleConfig
from diffgap.encoders import EncoderSet
from diffgap.encoders.base import EncoderFingerprint, l2_normalize
from diffgap.models.mapper_net import Mapper
from diffgap.models.refiner_net import RefinerNet, RefinerNetConfig
from diffgap.models.segments import segment_scores, two_sided_segment_scores, with_segment_scores

FORMAT = "diffgap-refiner"
VERSION = 1
DIRECTIONS = {"to_audio": 0, "from_audio": 1}
CONFIG_FILE = "refiner.json"
WEIGHTS_FILE = "model.safetensors"
MAPPER_FILE = "mapper.safetensors"  # the MLP mapper whose scores `mix` adds, when it has a weight
ADAPTER_FILE = "adapter.safetensors"  # the text adapter whose scores `mix` adds, when it has a weight
MAPPER_BACK_FILE = "mapper_back.safetensors"  # the audio -> query mapper of the library-side part
MAPPER_SPANS_FILE = "mapper_spans.safetensors"  # the span -> span mapper, where `span_map` is "mapped"
MAPPER_SPANS_BACK_FILE = "mapper_spans_back.safetensors"  # audio span -> query span, the spans' library side
# How a video query's time spans are taken toward audio space for the segment score: "refined", each
# as the whole query is (the network and the mix), or "mapped", by a mapper trained on span pairs.
SPAN_MAPS = ("refined", "mapped")
MIX_PARTS = ("refined", "mapped", "direct", "adapted")
# DDIM steps when a caller names none. Sampling starts from the prior's mean (z_N = 0), and from there
# every DDIM step keeps z along the first step's noise estimate, so 1 and 5 steps give vectors with
# cosine >= 0.99999 and the same ranking: identical R@1/R@5/R@10 on both SynthCaps seeds measured
# (text, BENCHMARKS.md run 6), and on run 1's video table 1 step was the best row. One step costs a
# fifth (0.26 against 1.06 ms per query). Every default of the CLI, the service and the library reads this.
DEFAULT_STEPS = 1
MODES = ("sample", "bridge")


class RefinerError(ValueError):
    """A refiner cannot be loaded or does not fit the index/encoders; the message says why."""


def blend_with_query(refined: np.ndarray, xq: np.ndarray, blend: float) -> np.ndarray:
    """Unit vectors whose cosine with any unit xb is (1 - blend) * refined.xb + blend * xq.xb, rescaled."""
    return refined if blend == 0 else l2_normalize((1 - blend) * refined + blend * xq)


def mix(vectors: list[np.ndarray], weights: tuple[float, ...] | list[float]) -> np.ndarray:
    """Unit vectors whose cosine with any unit xb ranks like sum_i w_i * cosine(vectors_i, xb)."""
    assert len(vectors) == len(weights), f"{len(vectors)} vector sets, {len(weights)} weights"
    return l2_normalize(sum(w * v for w, v in zip(weights, vectors, strict=True)))


def two_sided_scores(query_side: np.ndarray, raw: np.ndarray, mapped: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * query_side + weight * raw . mapped: query-side cosines (R, C) of R rows against C
    candidates, mixed with the rows as encoded (R, c) against the candidates mapped into their space
    (C, c). One formula for both directions: rows are queries and candidates audio, or the reverse."""
    if weight == 0:
        return query_side
    return (1 - weight) * query_side + weight * (raw @ mapped.T)  # (R, C)


def _save_module(path: Path, module: torch.nn.Module) -> None:
    """A module's weights as safetensors, replaced atomically."""
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, safetensors_bytes(tensors))


def _load_mapper(path: Path, in_dim: int, out_dim: int, hidden: int, why: str) -> Mapper:
    """A saved mapper, or a RefinerError saying `why` the refiner needs it."""
    mapper = Mapper(in_dim, out_dim, hidden)
    try:
        mapper.load_state_dict(load_file(str(path)))
    except (OSError, RuntimeError) as exc:
        raise RefinerError(f"{path.parent}: {why} but {path.name}: {exc}") from exc
    return mapper.eval()


@dataclass
class RefinerConfig:
    net: RefinerNetConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction_type: str = "epsilon"  # the paper's eps-MSE; "sample" predicts z_0 directly
    audio_fingerprint: dict[str, Any] | None = None  # encoder of the index (target of direction 0)
    query_fingerprint: dict[str, Any] | None = None  # encoder of the queries (text or video)
    query_modality: str = "text"
    # Weight of the direct similarity when a caller names none (query -> audio only). train-refiner
    # picks it on held-out pairs: where the refined vector alone wins, 0; where queries are easy
    # for the encoder already, mixing keeps what direct search gets right.
    blend: float = 0.0
    # Weights of the refined, mapped, direct and adapted scores (MIX_PARTS) of a query -> audio search
    # that names no blend, picked on held-out pairs by train-refiner; the mapper and the adapter are
    # saved beside the network. None: `blend` alone (refiners trained before it existed, or with a
    # fixed --blend). A query given as a vector has no words for the adapter: the other parts serve it.
    mix: dict[str, float] | None = None
    mapper_hidden: int = 512  # the saved mapper's width
    # Weight of the library-side part of a search that names no blend: each candidate's audio mapped
    # into the query space by a backward mapper (saved beside the network) and scored against the
    # query as encoded, mixed with the query-side score as (1 - w) * query-side + w * library-side.
    # Picked on held-out pairs by train-refiner after `mix`; 0: query-side only (and older refiners).
    library_weight: float = 0.0
    # Weight of the time-segment score (video queries on an index whose windows keep `segments` spans,
    # diffgap/models/segments.py): (1 - w) * the score above + w * the mean cosine of the query's and
    # the window's same spans. Picked on held-out pairs by train-refiner last; 0: no segments.
    segment_weight: float = 0.0
    segments: int = 0  # spans per clip the weight was picked with; a search needs the index to keep as many
    span_map: str = "refined"  # SPAN_MAPS: how the query's spans reach audio space; picked with the weight
    # Weight of the spans' library side within the segment score: each window's spans mapped into the
    # query space by a backward span mapper (saved beside the network) against the query's spans as
    # encoded, (1 - w) * query-side span score + w * library-side one; picked with `segment_weight`.
    span_library_weight: float = 0.0
    # Weight of the denoising-error score when a search asks for a rerank (diffusion/scoring.py): the
    # top 50 ordered by (1 - w) * the score above + w * the refiner's likelihood of each candidate,
    # both standardised. Picked on held-out pairs by train-refiner last, against the final ranking; 0:
    # they found no gain, and a rerank leaves the ranking as it is. None: trained before it was picked.
    rerank_weight: float | None = None
    adapter: dict[str, Any] | None = None  # the text adapter's config (TextAdapter.config), when it has a weight
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained, for the record

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RefinerConfig:
        if data.get("format") != FORMAT:
            raise RefinerError(f"not a refiner config (format {data.get('format')!r})")
        blend = float(data.get("blend", 0.0))  # older checkpoints were served unblended
        if not 0.0 <= blend <= 1.0:
            raise RefinerError(f"blend in refiner.json must be in [0, 1], got {blend}")
        mixed = data.get("mix")
        if mixed is not None and (
            not isinstance(mixed, dict)
            or set(mixed) - set(MIX_PARTS)
            or any(not isinstance(w, int | float) or w < 0 for w in mixed.values())
            or abs(sum(mixed.values()) - 1) > 1e-6
        ):
            raise RefinerError(f"mix in refiner.json must map {MIX_PARTS} to weights >= 0 that sum to 1, got {mixed}")
        library = data.get("library_weight", 0.0)
        if not isinstance(library, int | float) or not 0.0 <= library <= 1.0:
            raise RefinerError(f"library_weight in refiner.json must be in [0, 1], got {library!r}")
        segment = data.get("segment_weight", 0.0)
        if not isinstance(segment, int | float) or not 0.0 <= segment <= 1.0:
            raise RefinerError(f"segment_weight in refiner.json must be in [0, 1], got {segment!r}")
        spans = data.get("segments", 0)
        if not isinstance(spans, int) or spans < 0 or (segment > 0 and spans == 0):
            raise RefinerError(
                f"segments in refiner.json must be a count >= 0 (> 0 with a segment weight), got {spans!r}"
            )
        span_map = data.get("span_map", "refined")
        if span_map not in SPAN_MAPS:
            raise RefinerError(f"span_map in refiner.json must be one of {SPAN_MAPS}, got {span_map!r}")
        span_library = data.get("span_library_weight", 0.0)
        if not isinstance(span_library, int | float) or not 0.0 <= span_library <= 1.0:
            raise RefinerError(f"span_library_weight in refiner.json must be in [0, 1], got {span_library!r}")
        rerank = data.get("rerank_weight")
        if rerank is not None and (not isinstance(rerank, int | float) or not 0.0 <= rerank <= 1.0):
            raise RefinerError(f"rerank_weight in refiner.json must be in [0, 1] or null, got {rerank!r}")
        return cls(
            # checkpoints from before the trunk/skip condition paths existed were trained without them
            net=RefinerNetConfig(**{"cond_in_trunk": False, "query_skip": False, **data["net"]}),
            schedule=ScheduleConfig(**data["schedule"]),
            prediction_type=data["prediction_type"],
            audio_fingerprint=data.get("audio_fingerprint"),
            query_fingerprint=data.get("query_fingerprint"),
            query_modality=data.get("query_modality", "text"),
            blend=blend,
            mix=mixed,
            mapper_hidden=int(data.get("mapper_hidden", 512)),
            library_weight=float(library),
            segment_weight=float(segment),
            segments=spans,
            span_map=span_map,
            span_library_weight=float(span_library),
            rerank_weight=None if rerank is None else float(rerank),
            adapter=data.get("adapter"),
            training=data.get("training", {}),
        )


class Refiner:
    def __init__(
        self,
        config: RefinerConfig,
        net: RefinerNet | None = None,
        mapper: Mapper | None = None,
        adapter: TextAdapter | None = None,
        mapper_back: Mapper | None = None,
        mapper_spans: Mapper | None = None,
        mapper_spans_back: Mapper | None = None,
    ) -> None:
        self.config = config
        self.net = (net or RefinerNet(config.net)).eval()
        self.mapper = mapper.eval() if mapper is not None else None  # query -> audio, for `config.mix`
        # audio -> query, for `config.library_weight`
        self.mapper_back = mapper_back.eval() if mapper_back is not None else None
        # a video query's spans -> audio spans, for `config.segment_weight` where `config.span_map` is "mapped"
        self.mapper_spans = mapper_spans.eval() if mapper_spans is not None else None
        # a window's audio spans -> query spans, for `config.span_library_weight`
        self.mapper_spans_back = mapper_spans_back.eval() if mapper_spans_back is not None else None
        self.adapter = adapter  # texts -> audio space, for `config.mix`
        self.schedule = NoiseSchedule(config.schedule)
        self._traced: dict[int, torch.nn.Module] = {}
        self._trace_lock = threading.Lock()

    # ---- I/O ---------------------------------------------------------------------------------------
    def save(self, out: str | Path) -> None:
        """`model.safetensors` + `refiner.json`, each replaced atomically (the config last: it names a
        complete pair)."""
        out = Path(out)
        _save_module(out / WEIGHTS_FILE, self.net)
        for file, attribute, needed, _, _, why in self._mapper_slots():
            if needed:
                mapper = getattr(self, attribute)
                assert mapper is not None, f"{why} but the refiner has no {attribute}"
                _save_module(out / file, mapper)
        self.config.adapter = None
        if self.reads_text:
            assert self.adapter is not None, "config.mix weighs adapted scores but the refiner has no adapter"
            atomic_write_bytes(out / ADAPTER_FILE, safetensors_bytes(self.adapter.tensors()))
            self.config.adapter = self.adapter.config()
        atomic_write_json(out / CONFIG_FILE, self.config.to_json())

    def _mapper_slots(self) -> list[tuple[str, str, bool, int, int, str]]:
        """Each mapper a refiner may save beside its network: (file, attribute, whether the config
        weighs it, its input dim, its output dim, why the config needs it)."""
        c = self.config.net
        to_audio, from_audio = (c.query_dim, c.audio_dim), (c.audio_dim, c.query_dim)
        return [
            (MAPPER_FILE, "mapper", self._needs_mapper(), *to_audio, "refiner.json mixes in mapped scores"),
            (MAPPER_BACK_FILE, "mapper_back", self.two_sided, *from_audio, "refiner.json has a library_weight"),
            (MAPPER_SPANS_FILE, "mapper_spans", self._maps_spans(), *to_audio,
             "refiner.json maps time spans with a span mapper"),
            (MAPPER_SPANS_BACK_FILE, "mapper_spans_back", self.spans_two_sided, *from_audio,
             "refiner.json has a span_library_weight"),
        ]  # fmt: skip

    def _needs_mapper(self) -> bool:
        return bool(self.config.mix and self.config.mix.get("mapped", 0) > 0)

    def _maps_spans(self) -> bool:
        return self.config.segment_weight > 0 and self.config.span_map == "mapped"

    @property
    def spans_two_sided(self) -> bool:
        """Whether the segment score has a library side (`map_library_spans`, `span_scores`)."""
        return self.config.segment_weight > 0 and self.config.span_library_weight > 0

    @property
    def two_sided(self) -> bool:
        """Whether searches that name no blend add the library-side part (`map_library`, `two_sided_scores`)."""
        return self.config.library_weight > 0

    @property
    def reads_text(self) -> bool:
        """Whether query -> audio searches that name no blend weigh the text adapter's reading of the
        query's words (`adapt`), so a caller should pass it to `refine` as `adapted`."""
        return bool(self.config.mix and self.config.mix.get("adapted", 0) > 0)

    @classmethod
    def load(cls, path: str | Path) -> Refiner:
        path = Path(path)
        try:
            config = RefinerConfig.from_json(json.loads((path / CONFIG_FILE).read_text()))
            state = load_file(str(path / WEIGHTS_FILE))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RefinerError(f"cannot load refiner from {path}: {exc}") from exc
        net = RefinerNet(config.net)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise RefinerError(f"{path}: weights do not match refiner.json: {exc}") from exc
        refiner = cls(config, net)
        for file, attribute, needed, in_dim, out_dim, why in refiner._mapper_slots():
            if needed:
                setattr(refiner, attribute, _load_mapper(path / file, in_dim, out_dim, config.mapper_hidden, why))
        if refiner.reads_text:
            if not config.adapter:
                raise RefinerError(f"{path}: refiner.json mixes in adapted scores but describes no adapter")
            try:
                refiner.adapter = TextAdapter.load(config.adapter, load_file(str(path / ADAPTER_FILE)))
            except (OSError, AdapterError) as exc:
                raise RefinerError(f"{path}: {exc}") from exc
        return refiner

    def check_encoders(self, audio: EncoderFingerprint, query: EncoderFingerprint | None = None) -> None:
        """Refuse to run against vectors from encoders it was not trained on."""
        for role, want, have in (
            ("audio", self.config.audio_fingerprint, audio),
            ("query", self.config.query_fingerprint, query),
        ):
            if want is None or have is None:
                continue
            if EncoderFingerprint.from_dict(want).digest != have.digest:
                raise RefinerError(
                    f"this refiner was trained on {role} embeddings of {want['family']}:{want['model_id']} "
                    f"(fingerprint {EncoderFingerprint.from_dict(want).digest}), not of "
                    f"{have.family}:{have.model_id} ({have.digest}); retrain it with train-refiner"
                )

    def check_against(self, encoders: EncoderSet) -> None:
        """`check_encoders` with the index's audio encoder and the encoder of this refiner's query
        modality (when that one is loaded)."""
        query_encoder = encoders.get(self.config.query_modality)
        self.check_encoders(encoders.audio.fingerprint, query_encoder.fingerprint if query_encoder else None)

    @property
    def num_bytes(self) -> int:
        return self.net.num_bytes()

    def adapt(self, texts: list[str]) -> np.ndarray | None:
        """The text adapter's unit vectors (B, d) of the query texts, or None when the mix gives it no weight."""
        if not self.reads_text:
            return None
        assert self.adapter is not None, "config.mix weighs adapted scores but the refiner has no adapter"
        return self.adapter.encode(texts)

    def map_library(self, xb: np.ndarray) -> np.ndarray:
        """Audio rows (K, d) mapped into the query space (K, c) by the backward mapper: the library side
        of a two-sided search, computed once per item by the caller (`two_sided_scores` mixes them)."""
        assert self.mapper_back is not None, "config.library_weight > 0 but the refiner has no backward mapper"
        return self.mapper_back.map(xb)

    def map_library_spans(self, xb_spans: np.ndarray) -> np.ndarray:
        """Windows' spans (K, S, d) mapped into the query space (K, S, c) by the backward span mapper:
        the spans' library side, computed once per window by the caller (`span_scores` mixes them)."""
        assert self.mapper_spans_back is not None, "config.span_library_weight > 0 but no backward span mapper"
        k, s, d = xb_spans.shape
        return self.mapper_spans_back.map(xb_spans.reshape(k * s, d)).reshape(k, s, -1)

    def span_scores(
        self,
        query_spans: np.ndarray,
        raw_spans: np.ndarray,
        xb_spans: np.ndarray,
        xb_spans_mapped: np.ndarray | None = None,
    ) -> np.ndarray:
        """The segment score (B, N) as a search computes it: the queries' spans taken to audio space
        (B, S, d, `refine_with_spans`) against the windows' spans (N, S, d), and, where the refiner has
        a span library weight, the queries' spans as encoded (B, S, c) against the windows' spans
        mapped back (N, S, c; `map_library_spans` when the caller keeps none)."""
        scores = segment_scores(query_spans, xb_spans)  # (B, N)
        if not self.spans_two_sided:
            return scores
        if xb_spans_mapped is None:
            xb_spans_mapped = self.map_library_spans(xb_spans)  # (N, S, c)
        return two_sided_segment_scores(scores, raw_spans, xb_spans_mapped, self.config.span_library_weight)

    def scores(
        self,
        xq: np.ndarray,
        xb: np.ndarray,
        adapted: np.ndarray | None = None,
        segments: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Scores (B, N) of queries (B, c) against audio rows (N, d), ranked as a search that names no
        blend ranks them: the query side (`refine`), the library side when it has a weight, and with
        `segments` (the queries' spans (B, S, c), the rows' (N, S, d)) the segment score by its weight,
        each query span refined as the query is (`refine_with_spans`)."""
        spans = None
        if segments is not None and self.config.segment_weight:
            refined, spans = self.refine_with_spans(xq, segments[0])  # (B, d), (B, S, d)
        else:
            refined = self.refine(xq, adapted=adapted)  # (B, d)
        scores = refined @ xb.T  # (B, N)
        if self.two_sided:
            scores = two_sided_scores(scores, xq, self.map_library(xb), self.config.library_weight)
        if spans is not None:
            span = self.span_scores(spans, segments[0], segments[1])  # (B, N)
            scores = with_segment_scores(scores, span, self.config.segment_weight)
        return scores

    def refine_with_spans(self, xq: np.ndarray, spans: np.ndarray, **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """Queries (B, c) and each of their time spans (B, S, c) taken toward audio space: with
        `config.span_map` "refined" in one call (`refine` with `options`), each span as a whole query is
        (spans live in the clip vectors' space, so the same maps apply, and one call costs less than
        two, BENCHMARKS.md run 13: +0.13 / +0.14 R@1 above the spans as encoded on SynthCaps video);
        "mapped": the query refined, its spans by the mapper trained on span pairs (run 15)."""
        assert options.get("adapted") is None, "spans are a video query's: no text adapter reads them"
        b, s, c = spans.shape
        if self.config.span_map == "mapped":
            assert self.mapper_spans is not None, "config.span_map is 'mapped' but the refiner has no span mapper"
            return self.refine(xq, **options), self.mapper_spans.map(spans.reshape(b * s, c)).reshape(b, s, -1)
        out = self.refine(np.concatenate([xq, spans.reshape(b * s, c)]), **options)  # (B + B*S, d)
        return out[:b], out[b:].reshape(b, s, -1)  # (B, d), (B, S, d)

    # ---- refinement --------------------------------------------------------------------------------
    def dims(self, direction: int) -> tuple[int, int]:
        """(target dim, condition dim) of a direction."""
        c = self.config.net
        return (c.audio_dim, c.query_dim) if direction == 0 else (c.query_dim, c.audio_dim)

    @torch.inference_mode()
    def refine(
        self,
        xq: np.ndarray,
        *,
        direction: int = 0,
        steps: int = DEFAULT_STEPS,
        mode: str = "sample",
        start_step: int | None = None,
        start_noise: float | None = None,
        n_samples: int = 1,
        guidance: float = 1.0,
        blend: float | None = None,
        seed: int = 0,
        start: np.ndarray | None = None,
        adapted: np.ndarray | None = None,
    ) -> np.ndarray:
        """Map unit query vectors (B, c) to unit vectors in the target space (B, d).

        `blend=None` takes the refiner's own weights for query -> audio (`config.mix` when it has
        one, else `config.blend`), 0 otherwise. `start` (B, d): bridge mode's estimate of the target
        (default: the query). `adapted` (B, d): the queries' texts read by the adapter (`adapt`); without
        it the mix's other parts serve."""
        target_dim, cond_dim = self.dims(direction)
        mixed = self.config.mix if blend is None and direction == 0 else None
        if blend is None:
            blend = self.config.blend if direction == 0 and target_dim == cond_dim else 0.0
        xq = np.asarray(xq, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != cond_dim:
            raise RefinerError(f"query vectors of shape {xq.shape}; this refiner expects (B, {cond_dim})")
        if not 0.0 <= blend <= 1.0:
            raise RefinerError(f"blend must be in [0, 1], got {blend}")
        if blend > 0 and target_dim != cond_dim:
            raise RefinerError("blend needs the query and target spaces to have one size")
        if start_noise is None:
            # sample: start from the prior's mean, the deterministic path to the conditional mean that
            # cosine ranking rewards (BENCHMARKS.md); bridge: the noised query needs its noise
            start_noise = 0.0 if mode == "sample" else 1.0
        cond = torch.from_numpy(xq) * math.sqrt(cond_dim)  # (B, c), same rescaling as in training
        b = cond.shape[0]
        sampler = DDIMSampler(self.schedule, self.config.prediction_type)
        generator = torch.Generator().manual_seed(seed)
        total = torch.zeros(b, target_dim)
        for _ in range(max(1, n_samples)):
            # One draw shared by every row: a query's result must not depend on its neighbours in a batch.
            noise = torch.randn(1, target_dim, generator=generator).expand(b, target_dim)  # (B, d)
            if mode == "sample":
                sampler.set_timesteps(steps)
                z = noise * start_noise  # start_noise=0: from the prior's mean, the conditional-mean path
            elif mode == "bridge":
                origin = self._bridge_origin(cond, start, target_dim)  # (B, d)
                first = int(start_step if start_step is not None else self.schedule.num_train_timesteps // 2)
                sampler.set_timesteps(steps, start_step=first)
                n0 = torch.full((b,), int(sampler.timesteps[0]), dtype=torch.long)
                z = self.schedule.add_noise(origin, noise * start_noise, n0)
            else:
                raise RefinerError(f"unknown refinement mode {mode!r}; expected 'sample' or 'bridge'")
            for n in sampler.timesteps.tolist():
                out = self._guided(z, int(n), cond, direction, guidance)
                z = sampler.step(out, int(n), z)
            total += torch.nn.functional.normalize(z, dim=-1)
        refined = l2_normalize(total.numpy())  # (B, d)
        if mixed:
            return self._mixed(refined, xq, mixed, adapted)
        return blend_with_query(refined, xq, blend)

    def _mixed(
        self, refined: np.ndarray, xq: np.ndarray, weights: dict[str, float], adapted: np.ndarray | None
    ) -> np.ndarray:
        """`config.mix`: the refined, mapped, direct and adapted scores summed with their weights, as one
        vector. Without `adapted` (a query given as a vector) the other parts keep their weights, and
        where they have none the refined score alone serves."""
        if adapted is not None and adapted.shape != refined.shape:
            raise RefinerError(f"adapted vectors of shape {adapted.shape}; expected {refined.shape}")
        parts = {
            "refined": lambda: refined,
            "mapped": lambda: self.mapper.map(xq),
            "direct": lambda: xq,
            "adapted": lambda: adapted,
        }
        used = [name for name in MIX_PARTS if weights.get(name, 0) > 0 and (name != "adapted" or adapted is not None)]
        if not used:
            return refined
        return mix([parts[name]() for name in used], [weights[name] for name in used])

    @staticmethod
    def _bridge_origin(cond: torch.Tensor, start: np.ndarray | None, target_dim: int) -> torch.Tensor:
        """Bridge mode's starting estimate, rescaled like the training targets: `start` or the query."""
        if start is None:
            if cond.shape[1] != target_dim:
                raise RefinerError("bridge mode from the query needs the query and target spaces to have one size")
            return cond.clone()
        start = np.asarray(start, dtype=np.float32)
        if start.shape != (cond.shape[0], target_dim):
            raise RefinerError(f"bridge start of shape {start.shape}; expected {(cond.shape[0], target_dim)}")
        return torch.from_numpy(l2_normalize(start)) * math.sqrt(target_dim)

    def warm_up(self) -> None:
        """Trace the query -> audio network now (the first refinement would, at ~140 ms)."""
        cond_dim = self.dims(0)[1]
        self.refine(np.full((1, cond_dim), cond_dim**-0.5, dtype=np.float32), steps=1)

    def _conditional(self, direction: int) -> torch.nn.Module:
        """The network for one direction, traced once: a step at batch 1 is op-dispatch bound, and
        TorchScript halves it (0.27 -> 0.17 ms on 2 cores), which is most of what refinement costs
        per query. The trace holds the weights by reference and depends on no shapes."""
        traced = self._traced.get(direction)
        if traced is None:
            with self._trace_lock, torch.no_grad():
                traced = self._traced.get(direction)
                if traced is None:
                    target_dim, cond_dim = self.dims(direction)
                    example = (torch.zeros(2, target_dim), torch.zeros(2, dtype=torch.long), torch.zeros(2, cond_dim))
                    module = _OneDirection(self.net, direction)
                    try:  # deprecated in torch 2.x but still the cheapest dispatch; eager when it is gone
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", DeprecationWarning)
                            traced = torch.jit.trace(module, example, check_trace=False)
                    except (AttributeError, RuntimeError):
                        traced = module
                    self._traced[direction] = traced
        return traced

    def predict(self, z: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor, direction: int = 0) -> torch.Tensor:
        """The network's output (eps or z_0, per `config.prediction_type`) for rows z (B, d) at steps
        (B,) given rescaled conditions (B, c): the traced network, no guidance."""
        return self._conditional(direction)(z, steps, cond)

    def _guided(self, z: torch.Tensor, n: int, cond: torch.Tensor, direction: int, guidance: float) -> torch.Tensor:
        steps = torch.full((z.shape[0],), n, dtype=torch.long)
        out = self.predict(z, steps, cond, direction)
        if guidance == 1.0:
            return out
        uncond = self.net(z, steps, cond, direction, cond_mask=torch.zeros(z.shape[0], dtype=torch.bool))
        return uncond + guidance * (out - uncond)


class _OneDirection(torch.nn.Module):
    def __init__(self, net: RefinerNet, direction: int) -> None:
        super().__init__()
        self.net, self.direction = net, direction

    def forward(self, z: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(z, steps, cond, self.direction)


_SHARED: OrderedDict[tuple, Refiner] = OrderedDict()
_SHARED_LOCK = threading.Lock()
SHARED_MAX = 8


def load_shared(path: str | Path) -> Refiner:
    """`Refiner.load`, but the same object again while the files are the same ones (inode, size and
    mtime of both; a retrained refiner replaces them atomically, so it gets new inodes). Reloading a
    service must not trace the network anew each time: TorchScript keeps every traced class for the
    life of the process (~2 MB each, measured), so a reload loop would grow without bound."""
    path = Path(path).resolve()
    stats = [(path / name).stat() for name in (CONFIG_FILE, WEIGHTS_FILE)]
    key = (str(path), *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))
    with _SHARED_LOCK:
        if key in _SHARED:
            _SHARED.move_to_end(key)
            return _SHARED[key]
    refiner = Refiner.load(path)
    with _SHARED_LOCK:
        refiner = _SHARED.setdefault(key, refiner)
        while len(_SHARED) > SHARED_MAX:
            _SHARED.popitem(last=False)
    return refiner


def is_refiner_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_refiner(path: str | Path, encoders: EncoderSet) -> Refiner:
    """Load a refiner and check it against the encoders it will run with."""
    refiner = Refiner.load(path)
    refiner.check_against(encoders)
    return refiner
