"""A cache of GGUF checkpoints converted once into Hugging Face directories (safetensors + tokenizer + config).

Reading a GGUF file means parsing its metadata for the config and again for
the tokenizer, and dequantizing every tensor: tens of seconds for the built-in
model. The first load writes what it read as a plain directory, keyed by the
file's SHA-256, under `$XDG_CACHE_HOME/shunter/converted/` (or
`$SHUNTER_CONVERTED_DIR`); later loads read that directory, which takes a few
seconds. A different file — another model, a new release — has another
digest, so a stale entry is never used. A directory is published by an atomic
rename once complete, so a crash mid-write leaves nothing that looks usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_COMPLETE = "shunter-converted.ok"  # written last: the directory is whole


def cache_root() -> Path:
    """Where converted checkpoints live."""
    explicit = os.environ.get("SHUNTER_CONVERTED_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shunter" / "converted"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex (read in 8 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(8 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def converted_dir(gguf_path: Path) -> Path:
    """The cache directory of this GGUF file (it may not exist yet)."""
    return cache_root() / f"{gguf_path.stem}-{file_digest(gguf_path)[:16]}"


def is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE).is_file()


def save_converted(directory: Path, hf_model: Any, hf_tokenizer: Any) -> bool:
    """Write the model (safetensors) and tokenizer as an HF directory at `directory`; False if it could not.

    A read-only or full disk must not stop the model from loading: the cache is
    an optimisation, so failures here are swallowed (the next load converts again).
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".partial-") as tmp:
            staging = Path(tmp) / "model"
            staging.mkdir()
            _save_model(staging, hf_model)
            hf_tokenizer.save_pretrained(staging)
            (staging / _COMPLETE).write_text("converted from GGUF by shunter\n")
            if directory.exists():  # another process won the race, or an incomplete leftover
                if is_complete(directory):
                    return True
                shutil.rmtree(directory)
            os.rename(staging, directory)
        return True
    except (OSError, ValueError, RuntimeError):
        return False


def _save_model(directory: Path, hf_model: Any) -> None:
    """config.json and model.safetensors of a model read from GGUF (its tensors are already dequantized;
    transformers refuses `save_pretrained` on GGUF-loaded models, so the files are written directly)."""
    from safetensors.torch import save_file

    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # the tensors on disk are plain floats
    (directory / "config.json").write_text(json.dumps(config, indent=1, default=str))
    state = hf_model.state_dict()
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares the embedding's storage; it is re-tied on load
    save_file({name: t.detach().contiguous() for name, t in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
