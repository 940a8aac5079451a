"""Model loading and inference for the ml-service, with no Redis and no clock reads.

`ModelRunner` loads the file named by `ML_MODEL_PATH`: ONNX (preferred, run by ONNX
Runtime on one intra-op thread), a LightGBM text model, or, only when `allow_pickle=True`
is passed explicitly, a pickle (loading a pickle runs arbitrary code from the file).
The model card beside the model (`<stem>.card.json`) fixes the feature names and their
order; inputs that do not match are a clear error, never a silent reordering.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "CARD_FORMAT",
    "PICKLE_SUFFIXES",
    "FeatureMismatchError",
    "ModelCard",
    "ModelLoadError",
    "ModelRunner",
    "Prediction",
    "card_path_for",
    "default_model_path",
    "model_version_from_bytes",
]

logger = logging.getLogger(__name__)

CARD_FORMAT = "hean-model-card/1"
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
ML_MODEL_PATH_ENV = "ML_MODEL_PATH"


class ModelLoadError(RuntimeError):
    """The model or its card cannot be loaded (permanent until the file changes)."""


class FeatureMismatchError(ValueError):
    """The features given do not match the model card's feature list."""

    def __init__(self, missing: Sequence[str], extra: Sequence[str]) -> None:
        self.missing = tuple(missing)
        self.extra = tuple(extra)
        parts = []
        if self.missing:
            parts.append(f"missing features: {', '.join(self.missing)}")
        if self.extra:
            parts.append(f"unexpected features: {', '.join(self.extra)}")
        super().__init__("; ".join(parts) + " (the model card fixes the feature list)")


def model_version_from_bytes(data: bytes) -> str:
    """Model version string: a short hash of the model file's bytes."""
    return "lgbm-" + hashlib.sha256(data).hexdigest()[:12]


def card_path_for(model_path: Path) -> Path:
    """The card file beside a model: `models/default.onnx` -> `models/default.card.json`."""
    return model_path.with_name(model_path.stem + ".card.json")


def default_model_path() -> Path:
    """The default model shipped inside this package."""
    return Path(__file__).resolve().parent / "models" / "default.onnx"


@dataclass(frozen=True, slots=True)
class Prediction:
    """One model output.

    `prediction` is the probability that the label is 1 (close up over the horizon);
    `confidence` is |2 * prediction - 1|: 0 at a coin flip, 1 at certainty.
    """

    prediction: float
    confidence: float
    model_version: str


@dataclass(frozen=True, slots=True)
class ModelCard:
    """The parts of a model card the runner relies on, plus the whole document."""

    feature_names: tuple[str, ...]
    model_version: str | None
    model_sha256: str | None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read and check a card file; raises `ModelLoadError`."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read model card {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"model card {path} is not a JSON object")
        names = raw.get("feature_names")
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)
        ):
            raise ModelLoadError(f"model card {path}: feature_names must be unique strings")
        version = raw.get("model_version")
        sha = raw.get("model_sha256")
        return cls(
            feature_names=tuple(names),
            model_version=version if isinstance(version, str) else None,
            model_sha256=sha if isinstance(sha, str) else None,
            raw=raw,
        )


class _Backend(Protocol):
    def probabilities(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """P(label = 1) for each row of x."""
        ...


class _OnnxBackend:
    def __init__(self, data: bytes, n_features: int, intra_op_threads: int) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        # onnxruntime raises its own exception types, not exported for matching.
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"ONNX model must have 1 input, has {len(inputs)}")
        self._input = inputs[0].name
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if isinstance(width, int) and width != n_features:
            raise ModelLoadError(f"ONNX model takes {width} features, the card lists {n_features}")
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "probabilities" not in outputs:
            raise ModelLoadError(
                f"ONNX model has no 'probabilities' output (outputs: {sorted(outputs)}); "
                "export with zipmap=False"
            )

    def probabilities(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        (out,) = self._session.run(["probabilities"], {self._input: x.astype(np.float32)})
        return np.asarray(out, dtype=np.float64)[:, 1]


class _LightGBMBackend:
    def __init__(self, booster: Any) -> None:
        self._booster = booster

    def probabilities(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(self._booster.predict(x), dtype=np.float64)


class _PredictProbaBackend:
    def __init__(self, model: Any) -> None:
        self._model = model

    def probabilities(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(self._model.predict_proba(x), dtype=np.float64)[:, 1]


@dataclass(frozen=True, slots=True)
class _Loaded:
    backend: _Backend
    card: ModelCard
    model_format: str
    model_version: str
    sha256: str
    signature: tuple[int, int, int, int]


def _file_signature(model: Path, card: Path) -> tuple[int, int, int, int]:
    ms = model.stat()
    cs = card.stat() if card.exists() else None
    return (
        ms.st_mtime_ns,
        ms.st_size,
        cs.st_mtime_ns if cs else -1,
        cs.st_size if cs else -1,
    )


def _is_pickle(path: Path, data: bytes) -> bool:
    # Protocol 2+ pickles start with the PROTO opcode 0x80; joblib files are pickles too.
    return path.suffix.lower() in PICKLE_SUFFIXES or data[:1] == b"\x80"


def _load(path: Path, *, allow_pickle: bool, intra_op_threads: int) -> _Loaded:
    card_path = card_path_for(path)
    try:
        signature = _file_signature(path, card_path)
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
    is_pickle = _is_pickle(path, data)
    if is_pickle and not allow_pickle:
        raise ModelLoadError(
            f"refusing to load pickle {path}: unpickling runs code from the file. "
            "Use an ONNX or LightGBM text model, or pass allow_pickle=True if you trust it"
        )
    sha = hashlib.sha256(data).hexdigest()
    card = ModelCard.load(card_path) if card_path.exists() else None
    if card is not None and card.model_sha256 is not None and card.model_sha256 != sha:
        raise ModelLoadError(
            f"model card {card_path} describes another file (sha256 {card.model_sha256[:12]}, "
            f"model file {sha[:12]}); retrain or copy the matching card"
        )

    backend: _Backend
    if is_pickle:
        if card is None:
            raise ModelLoadError(f"model card {card_path} not found (required for a pickle)")
        model = pickle.loads(data)  # noqa: S301 - explicitly allowed by the caller
        if hasattr(model, "predict_proba"):
            backend = _PredictProbaBackend(model)
        elif hasattr(model, "predict"):
            backend = _LightGBMBackend(model)
        else:
            raise ModelLoadError(f"pickled object {type(model).__name__} cannot predict")
        model_format = "pickle"
    elif data[:5] == b"tree\n":
        import lightgbm as lgb

        try:
            booster = lgb.Booster(model_str=data.decode("utf-8"))
        except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"LightGBM cannot load {path}: {exc}") from exc
        names = tuple(booster.feature_name())
        if card is None:
            # A LightGBM text model names its features itself; the card is optional.
            if all(n.startswith("Column_") for n in names):
                raise ModelLoadError(
                    f"{path} has no feature names and no card {card_path} gives them"
                )
            card = ModelCard(feature_names=names, model_version=None, model_sha256=None)
        elif names != card.feature_names:
            raise ModelLoadError(
                f"LightGBM model features {list(names)} differ from card {list(card.feature_names)}"
            )
        backend = _LightGBMBackend(booster)
        model_format = "lightgbm-text"
    else:
        if card is None:
            raise ModelLoadError(
                f"model card {card_path} not found: an ONNX model needs its card for the "
                "feature list (python -m hean.ml.train writes both)"
            )
        backend = _OnnxBackend(data, len(card.feature_names), intra_op_threads)
        model_format = "onnx"
    version = card.model_version or model_version_from_bytes(data)
    return _Loaded(
        backend=backend,
        card=card,
        model_format=model_format,
        model_version=version,
        sha256=sha,
        signature=signature,
    )


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """Prediction cache counters."""

    hits: int
    misses: int
    size: int
    max_size: int


class ModelRunner:
    """Runs one model: validates inputs against its card, caches, hot-reloads.

    Thread-safe: `predict` may run in a worker thread (for a timeout) while
    `reload_if_changed` swaps the model; a prediction uses one model from start to end.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        allow_pickle: bool = False,
        allow_extra_features: bool = False,
        cache_size: int = 4096,
        intra_op_threads: int = 1,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.model_path = Path(model_path)
        self.allow_pickle = allow_pickle
        self.allow_extra_features = allow_extra_features
        self.intra_op_threads = intra_op_threads
        self.last_reload_error: str | None = None
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, tuple[float, ...]], Prediction] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()
        self._failed_signature: tuple[int, int, int, int] | None = None
        self._loaded = _load(
            self.model_path, allow_pickle=allow_pickle, intra_op_threads=intra_op_threads
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> ModelRunner:
        """Runner for `ML_MODEL_PATH`, or the packaged default model when it is unset."""
        environ = os.environ if env is None else env
        path = environ.get(ML_MODEL_PATH_ENV) or str(default_model_path())
        return cls(path, **kwargs)

    @property
    def model_version(self) -> str:
        """Version of the model in use (from its card, else a hash of its bytes)."""
        return self._loaded.model_version

    @property
    def model_format(self) -> str:
        """`onnx`, `lightgbm-text` or `pickle`."""
        return self._loaded.model_format

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names in the order the model consumes them."""
        return self._loaded.card.feature_names

    @property
    def card(self) -> ModelCard:
        """The model card in use."""
        return self._loaded.card

    def check_features(self, names: Sequence[str] | Mapping[str, Any]) -> None:
        """Raise `FeatureMismatchError` naming missing (and, unless allowed, extra) features."""
        self._check(self._loaded, names)

    def _check(self, loaded: _Loaded, names: Sequence[str] | Mapping[str, Any]) -> None:
        given = set(names)
        expected = loaded.card.feature_names
        missing = [n for n in expected if n not in given]
        extra = [] if self.allow_extra_features else sorted(given.difference(expected))
        if missing or extra:
            raise FeatureMismatchError(missing, extra)

    def _row(self, loaded: _Loaded, features: Mapping[str, float]) -> tuple[float, ...]:
        self._check(loaded, features)
        row = tuple(float(features[n]) for n in loaded.card.feature_names)
        bad = [
            n for n, v in zip(loaded.card.feature_names, row, strict=True) if not math.isfinite(v)
        ]
        if bad:
            raise ValueError(f"non-finite feature values: {', '.join(bad)}")
        return row

    def predict(self, features: Mapping[str, float]) -> Prediction:
        """Probability of up and confidence for one feature row.

        Raises `FeatureMismatchError` if the names differ from the card, `ValueError` for a
        NaN or infinite value. Identical rows are answered from a bounded LRU cache.
        """
        return self.predict_batch([features])[0]

    def predict_batch(self, rows: Sequence[Mapping[str, float]]) -> list[Prediction]:
        """`predict` for several rows with one model call for the cache misses."""
        loaded = self._loaded
        keys = [(loaded.model_version, self._row(loaded, r)) for r in rows]
        results: list[Prediction | None] = [None] * len(keys)
        todo: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is None:
                    todo.append(i)
                else:
                    self._cache.move_to_end(key)
                    self._hits += 1
                    results[i] = hit
        if todo:
            x = np.array([keys[i][1] for i in todo], dtype=np.float64)
            probabilities = loaded.backend.probabilities(x)
            with self._lock:
                for i, p in zip(todo, probabilities.tolist(), strict=True):
                    prob = min(max(float(p), 0.0), 1.0)
                    prediction = Prediction(
                        prediction=prob,
                        confidence=abs(2.0 * prob - 1.0),
                        model_version=loaded.model_version,
                    )
                    results[i] = prediction
                    self._misses += 1
                    if self._cache_size:
                        self._cache[keys[i]] = prediction
                        self._cache.move_to_end(keys[i])
                        while len(self._cache) > self._cache_size:
                            self._cache.popitem(last=False)
        return [r for r in results if r is not None]

    def cache_info(self) -> CacheInfo:
        """Hits, misses and size of the prediction cache."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._cache_size)

    def reload_if_changed(self) -> bool:
        """Reload the model if its file or card changed on disk; True if a new model is in use.

        A file whose bytes are unchanged (only touched) is not reloaded. If the new file
        fails to load, the current model stays in use, the error is logged and kept in
        `last_reload_error`, and that same file state is not retried until it changes again.
        """
        current = self._loaded
        card_path = card_path_for(self.model_path)
        try:
            signature = _file_signature(self.model_path, card_path)
        except OSError as exc:
            return self._reload_failed(None, f"cannot stat model file {self.model_path}: {exc}")
        if signature == current.signature or signature == self._failed_signature:
            return False
        try:
            loaded = _load(
                self.model_path,
                allow_pickle=self.allow_pickle,
                intra_op_threads=self.intra_op_threads,
            )
        except ModelLoadError as exc:
            return self._reload_failed(signature, str(exc))
        self._failed_signature = None
        self.last_reload_error = None
        if loaded.sha256 == current.sha256 and loaded.card.raw == current.card.raw:
            # Same bytes: keep the running session, remember the new stat signature.
            self._loaded = _Loaded(
                current.backend,
                current.card,
                current.model_format,
                current.model_version,
                current.sha256,
                loaded.signature,
            )
            return False
        self._loaded = loaded
        with self._lock:
            self._cache.clear()
        logger.info(
            "model reloaded from %s: %s -> %s",
            self.model_path,
            current.model_version,
            loaded.model_version,
        )
        return True

    def _reload_failed(self, signature: tuple[int, int, int, int] | None, message: str) -> bool:
        self._failed_signature = signature
        self.last_reload_error = message
        logger.error("model reload failed, keeping %s: %s", self.model_version, message)
        return False
