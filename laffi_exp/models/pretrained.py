"""Pretrained base LLMs: any transformers causal LM from a local folder, or a hub id (from the hub when
it is reachable, else from the local Hugging Face cache), or a GGUF checkpoint (converted once, see
``laffi_exp.models.gguf``), with optional 4-bit QLoRA loading."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from laffi_exp.core.env import env_true
from laffi_exp.core.errors import ConfigError
from laffi_exp.models import gguf
from laffi_exp.models.base import BaseModel, ModelSource

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")
WEIGHTS_FROM = ("auto", "hub", "package")
HUB_PROBE_TIMEOUT_S = 5.0  # one request; huggingface_hub's own retries take ~25 s per file when offline
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def hub_offline() -> bool:
    """Whether the user asked for no hub access (HF_HUB_OFFLINE, or the older TRANSFORMERS_OFFLINE)."""
    return env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One request to the hub endpoint, without retries: any HTTP answer counts as reachable."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, connection, proxy, TLS or timeout: all mean "cannot download now"
        return False
    return True


def _causal_lm_problem(config, trust_remote_code: bool) -> str | None:
    """Why ``config`` does not describe a causal (decoder-only) LM, or None if it does."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"it holds an encoder-decoder model ({model_type}), not a causal LM"
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type not in CAUSAL and not remote:
        return f"model_type {model_type!r} has no causal-LM class in transformers (not a causal LM)"
    architectures = getattr(config, "architectures", None) or []
    causal_classes = set(CAUSAL.values())
    if (
        architectures
        and not remote
        and not any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    ):
        return f"it holds {', '.join(architectures)} (a {model_type} model), not a causal LM"
    # Encoder families (BERT, RoBERTa, ...) have a causal-LM class too, but it is only for their decoders.
    if not architectures and model_type in MASKED and not getattr(config, "is_decoder", False):
        return f"it holds an encoder model ({model_type}), not a causal LM"
    return None


class PretrainedBase(ModelSource):
    """Any transformers causal LM from a local folder, or a hub id.

    A hub id is downloaded when the hub is reachable; offline (``HF_HUB_OFFLINE=1``, or the hub not
    answering one short request) it loads from the local Hugging Face cache, or fails at once.
    ``gguf_file`` names a GGUF checkpoint in that folder or hub repo instead: it is converted once into
    a transformers folder under ``convert_dir``. ``package`` names an installed registry package that
    carries a GGUF of the same model (``weights_from``: ``auto`` uses it when the hub id cannot be had,
    ``package`` always, ``hub`` never).
    Tokenizers without a pad token get one: EOS, else UNK, else a new ``<pad>`` (embeddings resized);
    padding is masked out of attention and loss, so reusing EOS or UNK changes no result."""

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        chat_template: bool = False,
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        cache_dir: str | None = None,
        gguf_file: str | None = None,
        package: str | None = None,
        package_extra: str | None = None,
        weights_from: str = "auto",
        convert_dir: str | None = None,
    ):
        self.name_or_path = str(name_or_path)
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.chat_template = chat_template
        self.load_in_4bit = load_in_4bit
        self.gradient_checkpointing = gradient_checkpointing
        self.cache_dir = str(Path(cache_dir).expanduser()) if cache_dir else None
        self.gguf_file = gguf_file
        self.package = package
        self.package_extra = package_extra
        self.weights_from = weights_from
        self.convert_dir = (
            Path(convert_dir).expanduser() if convert_dir else Path("~/.cache/laffi_exp/gguf").expanduser()
        )
        self._source: str | None = None  # what check() found to load from: a folder, or the hub id
        self._gguf: Path | None = None  # the GGUF file to convert (check() found it)
        self._fingerprint: dict | None = None
        self._checked = False

    # -- checks before any weights are read ---------------------------------------------------------
    def check(self) -> None:
        """Raise ConfigError for anything that would fail later: option values, the folder or hub id, a
        config that is not a causal LM. Reads config.json only (downloading it when online)."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_in_4bit:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    "model.load_in_4bit: 4-bit loading needs the bitsandbytes package (pip install bitsandbytes) "
                    "and a CUDA GPU; set model.load_in_4bit=false on this machine"
                )
            if not torch.cuda.is_available():
                raise ConfigError(
                    "model.load_in_4bit: 4-bit loading needs a CUDA GPU and none is available; "
                    "set model.load_in_4bit=false"
                )
        if self.weights_from not in WEIGHTS_FROM:
            raise ConfigError(
                f"model.weights_from: expected one of {', '.join(WEIGHTS_FROM)}, got {self.weights_from!r}"
            )
        if self.weights_from == "package" and not self.package:
            raise ConfigError(
                "model.weights_from: 'package' needs model.package (an installed package that carries a GGUF)"
            )
        if self.weights_from == "package":
            self._gguf = self._package_gguf()
        else:
            try:
                self._locate()
            except ConfigError as err:
                if not (self.package and self.weights_from == "auto"):
                    raise
                if importlib.util.find_spec(self.package) is None:
                    raise ConfigError(f"{err}; or install this model's offline copy: {self._install_hint()}") from None
                log.warning("%s: using the GGUF checkpoint of the installed package %s", err, self.package)
                self._gguf = self._package_gguf()
        if self._gguf is not None:
            gguf.gguf_architecture(self._gguf)  # a readable GGUF of an architecture transformers loads
            self._checked = True
            return
        problem = _causal_lm_problem(self._config(), self.trust_remote_code)
        if problem:
            raise ConfigError(f"model.name_or_path: {self.name_or_path!r}: {problem}")
        if self._is_local:
            self._check_weights(Path(self._source))
        self._checked = True

    def _locate(self) -> None:
        """Find what to load: a folder, a hub id (or its cached folder), or the GGUF file in either."""
        path = Path(self.name_or_path).expanduser()
        local = path.exists() or self._looks_like_path()
        if self.gguf_file:
            gguf.require_gguf("model.gguf_file")
            self._gguf = self._local_gguf(path) if local else self._hub_gguf()
        elif local:
            self._check_folder(path)
            self._source = str(path)
        else:
            self._source = self._check_hub_id()

    def _local_gguf(self, path: Path) -> Path:
        if not path.is_dir():
            raise ConfigError(
                f"model.name_or_path: {self.name_or_path!r}: no such folder (it should hold model.gguf_file)"
            )
        file = path / self.gguf_file
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ConfigError(
                f"model.gguf_file: {file} does not exist" + (f" (the folder holds {', '.join(found)})" if found else "")
            )
        return file

    def _hub_gguf(self) -> Path:
        """The GGUF file of a hub repo: downloaded when the hub is reachable, else from the local cache."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(self.name_or_path, self.gguf_file, cache_dir=self.cache_dir)
        if isinstance(cached, str):
            return Path(cached)
        where = f"model.name_or_path: {self.name_or_path!r}"
        if hub_offline() or not hub_reachable():
            raise ConfigError(
                f"{where}: {self.gguf_file} is not in the local Hugging Face cache, and the hub cannot be reached; "
                "download it first (hf download ID FILE) or give a local folder"
            )
        return Path(self._loading(hf_hub_download, self.name_or_path, self.gguf_file, cache_dir=self.cache_dir))

    def _package_gguf(self) -> Path:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(f"model.package: {self.package} is not installed; install it: {self._install_hint()}")
        gguf.require_gguf("model.package")
        return gguf.from_package(self.package, self.convert_dir)

    def _install_hint(self) -> str:
        if self.package_extra:
            return f'pip install -e ".[{self.package_extra}]" (or pip install "laffi_exp[{self.package_extra}]")'
        return f"pip install {self.package.replace('_', '-')} gguf"

    def _looks_like_path(self) -> bool:
        name = self.name_or_path
        # A hub id is "name" or "owner/name"; anything else that names no existing path is a missing folder.
        return (
            Path(name).expanduser().is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
        )

    def _check_folder(self, path: Path) -> None:
        where = f"model.name_or_path: {self.name_or_path!r}"
        if not path.exists():
            raise ConfigError(f"{where}: no such folder")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(
                f"{where} is not a model folder (expected a directory with config.json, weights and tokenizer files)"
            )

    def _check_weights(self, path: Path) -> None:
        if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
            raise ConfigError(
                f"model.name_or_path: {self.name_or_path!r} is not a model folder: "
                "it has config.json but no weights (*.safetensors or *.bin)"
            )

    def _check_hub_id(self) -> str:
        """What to load a hub id from: the id itself when the hub is reachable, else its folder in the local
        cache (a folder, because transformers still asks the hub for some files of an id when told
        local_files_only); raises ConfigError when neither can work."""
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        where = f"model.name_or_path: {self.name_or_path!r}"
        try:
            validate_repo_id(self.name_or_path)
        except HFValidationError:
            raise ConfigError(f"{where} is neither an existing folder nor a valid hub id (owner/name)") from None
        cached = isinstance(try_to_load_from_cache(self.name_or_path, "config.json", cache_dir=self.cache_dir), str)
        if hub_offline():
            if not cached:
                raise ConfigError(
                    f"{where} is not a local folder and not in the local Hugging Face cache, and the hub is off "
                    "(HF_HUB_OFFLINE is set); download it first (hf download ID) or give a local folder"
                )
            return self._cached_folder()
        if hub_reachable():
            return self.name_or_path
        if not cached:
            raise ConfigError(
                f"{where} is not a local folder and not in the local Hugging Face cache, and the hub "
                f"({_endpoint()}) cannot be reached; download it elsewhere and give its folder"
            )
        log.warning("The hub cannot be reached: loading %s from the local Hugging Face cache", self.name_or_path)
        return self._cached_folder()

    def _cached_folder(self) -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(self.name_or_path, cache_dir=self.cache_dir, local_files_only=True)

    @property
    def _is_local(self) -> bool:
        return self._source is not None and Path(self._source).is_dir()

    def _hub_kwargs(self) -> dict:
        return dict(trust_remote_code=self.trust_remote_code, local_files_only=self._is_local, cache_dir=self.cache_dir)

    def _config(self):
        from transformers import AutoConfig

        return self._loading(AutoConfig.from_pretrained, self._source, **self._hub_kwargs())

    def _loading(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with transformers' loading errors turned into one ConfigError line."""
        from safetensors import SafetensorError

        try:
            return fn(*args, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise ConfigError(f"model.name_or_path: cannot load {self.name_or_path!r} as a causal LM: {first}") from err
        except SafetensorError as err:  # a truncated or damaged weights file
            text = str(err).strip()
            files = sorted(p.name for p in Path(str(self._source)).glob("*.safetensors")) if self._source else []
            where = (
                f"{Path(str(self._source)) / files[0]}"
                if len(files) == 1
                else f"the .safetensors files of {self._source}"
            )
            raise ConfigError(
                f"model.name_or_path: {where} is damaged or incomplete "
                f"({text.splitlines()[0] if text else 'unreadable'})"
            ) from err

    # -- loading -----------------------------------------------------------------------------------
    def load(self) -> BaseModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not self._checked:  # the pipeline checks first; a second hub probe would only cost time
            self.check()
        if self._gguf is not None and self._fingerprint is None:  # converted once, then read from the cache
            folder, self._fingerprint = gguf.converted(self._gguf, self.convert_dir)
            self._source = str(folder)
            problem = _causal_lm_problem(self._config(), self.trust_remote_code)
            if problem:
                raise ConfigError(f"model.gguf_file: {self._gguf.name}: {problem}")
        kwargs = self._hub_kwargs()
        tokenizer = self._loading(AutoTokenizer.from_pretrained, self._source, **kwargs)
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        if self.load_in_4bit:
            kwargs.update(self._quantization())
        model = self._loading(AutoModelForCausalLM.from_pretrained, self._source, dtype=dtype, **kwargs)
        self._set_pad_token(model, tokenizer)
        if self.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            # Non-reentrant checkpointing needs no input-gradient hook for frozen embeddings.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(
                    f"model.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing"
                )
            enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.gradient_checkpointing:
            model.config.use_cache = False  # the KV cache is useless in training; generation asks for it explicitly
        chat = self.chat_template and bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template and not chat:
            log.warning(
                "model.chat_template is true but %s's tokenizer has no chat template: prompts stay plain",
                self.name_or_path,
            )
        return BaseModel(
            model=model,
            tokenizer=tokenizer,
            name=self.name_or_path,
            path=self._source,
            chat_template=chat,
            fingerprint=self._fingerprint,
        )

    def _quantization(self) -> dict:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        # 4-bit weights cannot be moved after loading: put them on this process's GPU (DDP: its local rank).
        return dict(quantization_config=quantization, device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})

    @staticmethod
    def _set_pad_token(model, tokenizer) -> None:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            elif tokenizer.unk_token is not None:
                tokenizer.pad_token = tokenizer.unk_token
            else:
                tokenizer.add_special_tokens({"pad_token": "<pad>"})
                model.resize_token_embeddings(len(tokenizer))
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
