"""Fully sharded training (``trainer=fsdp`` or ``fsdp_cpu``): how the LoRA model is wrapped into FSDP
units, and how the trained adapter is gathered from the shards onto a whole model again."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def uses_fsdp(cfg: DictConfig) -> bool:
    """Whether the trainer shards the model with FSDP (trainer=fsdp or fsdp_cpu)."""
    return "FSDPStrategy" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default=""))


FSDP_SCHEME = 2


def prepare_fsdp(strategy, peft_model, precision: str) -> None:
    """Settings that LoRA under FSDP needs, where ``trainer.strategy`` leaves them unset:

    - units: each transformer block (the classes the model names in ``_no_split_modules``), and each
      LoRA weight on its own. One unit for the whole model would gather every weight in each forward;
      a LoRA weight inside its block's unit would mix dtypes (fp32 adapter, bf16 base: FSDP refuses)
      and give the frozen weights a gradient buffer.
    - every rank starts from rank 0's adapter, as under DDP (FSDP's ``sync_module_states`` needs GPUs).
    - precision as under DDP: ``bf16-mixed``/``16-mixed`` compute in half precision but reduce gradients
      and keep buffers (rotary frequencies) in fp32; ``32-true`` casts nothing. (Lightning's FSDP
      defaults cast every weight, gradient and buffer to the one dtype the precision names.)
    """
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import CustomPolicy

    if strategy.kwargs.get("auto_wrap_policy") is None:
        names = set(getattr(peft_model.get_base_model(), "_no_split_modules", None) or ())
        layers = {type(m) for m in peft_model.modules() if type(m).__name__ in names}
        if not layers:
            log.warning(
                "FSDP: %s names no transformer block class: only the LoRA weights are units of their own",
                type(peft_model.get_base_model()).__name__,
            )
        log.info(
            "FSDP: one unit per %s and per LoRA weight", ", ".join(sorted(c.__name__ for c in layers)) or "(no block)"
        )
        strategy.kwargs["auto_wrap_policy"] = CustomPolicy(
            lambda module: type(module) in layers or _trainable_leaf(module)
        )
    if torch.distributed.is_initialized():
        for p in peft_model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)
    if strategy.mixed_precision is None:
        half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
        if half is not None:
            strategy.mixed_precision = MixedPrecision(
                param_dtype=half, reduce_dtype=torch.float32, buffer_dtype=torch.float32
            )
        elif (
            str(precision) == "32-true"
        ):  # no casting: a bf16 base computes in bf16 as under DDP (Lightning casts it to fp32)
            strategy.mixed_precision = MixedPrecision()


def _trainable_leaf(module) -> bool:
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def gather_adapter(strategy, peft_model) -> dict[str, torch.Tensor]:
    """The trained LoRA weights, whole, on every rank (CPU copies, named as in an unwrapped peft model),
    from a model that FSDP has sharded. Every rank must call it (it is a collective). Only the units that
    hold LoRA weights are gathered, one at a time; with another wrapping the whole model is, in host memory."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainable = {_unwrapped_name(n) for n, p in peft_model.named_parameters() if p.requires_grad}
    prefix = {id(m): _unwrapped_name(n) for n, m in peft_model.named_modules()}
    adapter = {}
    for unit in FSDP.fsdp_modules(strategy.model):  # the same units in the same order on every rank
        if _trainable_leaf(unit.module):
            with FSDP.summon_full_params(unit, writeback=False):
                for name, p in unit.module.named_parameters():
                    adapter[f"{prefix[id(unit.module)]}.{name}"] = p.detach().to("cpu", copy=True)
    if set(adapter) == trainable:
        return adapter
    offload = strategy.root_device.type != "cpu"
    with FSDP.summon_full_params(strategy.model, writeback=False, offload_to_cpu=offload):
        return {
            _unwrapped_name(n): p.detach().to("cpu", copy=True)
            for n, p in peft_model.named_parameters()
            if p.requires_grad
        }


def load_adapter(peft_model, adapter: dict[str, torch.Tensor]) -> None:
    """Put gathered adapter weights into a freshly built peft model; every trainable weight must be there."""
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    if trainable != set(adapter):
        raise RuntimeError(
            "FSDP: the gathered adapter does not match the rebuilt model "
            f"(missing {sorted(trainable - set(adapter))[:3]}, "
            f"unexpected {sorted(set(adapter) - trainable)[:3]})"
        )
    peft_model.load_state_dict(adapter, strict=False)


def _unwrapped_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    """Lightning's FSDP on CPU processes (gloo), which Lightning itself refuses: the FSDP code paths
    (sharding, clipping, gathering the adapter) tested without GPUs (``trainer=fsdp_cpu``). Not a way
    to train faster: use ``trainer=ddp_cpu`` for that."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                model,
                sharding_strategy=self.sharding_strategy,
                mixed_precision=self.mixed_precision_config,
                cpu_offload=self.cpu_offload,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied
        return super()._setup_model(model)  # finds it wrapped: the rest of Lightning's set-up


def reloaded(source, lora_config, adapter: dict[str, torch.Tensor]):
    """The base model loaded again from ``source``, with the adapter weights gathered from FSDP's shards
    (every rank)."""
    import gc

    from peft import get_peft_model

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sharded model's memory, before a whole copy arrives
    model = get_peft_model(source.load().model, lora_config)
    load_adapter(model, adapter)
    log.info("FSDP: gathered %d adapter tensors onto the reloaded base model", len(adapter))
    return model
