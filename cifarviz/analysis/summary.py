"""Layer tables (layer, type, output shape, parameters) through torchinfo, and the facts of shipped checkpoints.

A shipped checkpoint's architecture, arguments and size come from the checkpoint itself
(fastnet ships with widths 48/192/192, not the zoo defaults), so the CLI and the Models
page both build what they show with `model_for_summary` and `shipped_checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchinfo import summary as torchinfo_summary

from cifarviz.core.checkpoint import MAX_PARAMETERS, load_checkpoint, read_metadata, shipped_file, shipped_files
from cifarviz.core.errors import ModelError
from cifarviz.core.models import ZooModel, count_parameters, create_model, model_card, validate_arch_args


def build_architecture(architecture: str, args: dict | None = None) -> ZooModel:
    """The zoo model with `args` on the meta device: shapes only, no memory, no download. The arguments are
    checked against the card's bounds and the size limit, as loading a checkpoint checks them (metadata is
    untrusted: `blocks: 20000` must not take minutes and gigabytes to print a table)."""
    card = model_card(architecture)
    kwargs = {**validate_arch_args(architecture, args or {}), **card.file_args}  # never fetch weights for a table
    try:
        with torch.device("meta"):
            model = create_model(architecture, **kwargs)
    except ValueError as exc:  # arguments the layers reject (GroupNorm groups)
        raise ModelError(f"{architecture} with arguments {kwargs}: {exc}") from None
    if count_parameters(model) > MAX_PARAMETERS:
        raise ModelError(f"{architecture} with arguments {kwargs} would have {count_parameters(model):,} parameters, "
                         f"more than cifarviz loads ({MAX_PARAMETERS:,}); its arguments are probably wrong.")
    return model


def model_for_summary(name_or_checkpoint: str | Path, architecture: str | None = None) -> ZooModel:
    """What to summarise for NAME: a checkpoint file or a shipped checkpoint's name gives its architecture
    with its stored arguments; any other zoo name gives that architecture with default arguments.

    `architecture` names the zoo model of a `.pt`/`.pth` state dict that stores none.
    """
    path = Path(name_or_checkpoint)
    if not path.is_file():
        shipped = shipped_file(str(name_or_checkpoint))
        if shipped is None:
            return build_architecture(str(name_or_checkpoint))  # unknown names raise ModelError listing the zoo
        path = shipped
    meta = read_metadata(path)
    architecture = architecture or meta.get("architecture")
    if architecture is None:  # a bare state dict: only its tensors tell the architecture
        return load_checkpoint(path).model
    return build_architecture(architecture, meta.get("arch_args"))


def changed_args(model: ZooModel) -> dict:
    """The model's arguments that differ from its zoo defaults (e.g. fastnet's widths)."""
    card = model_card(model.arch_name)
    defaults = card.defaults()
    same = lambda key, value: key in defaults and json.dumps(value) == json.dumps(defaults[key])
    return {k: v for k, v in model.arch_args.items() if not same(k, v) and k not in card.file_args}


def describe_args(model: ZooModel) -> str:
    changed = changed_args(model)
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()) or "default arguments"


def shipped_checkpoints() -> list[dict]:
    """One row per shipped checkpoint, read from its metadata (cheap: the safetensors header only)."""
    rows = []
    for path in shipped_files():
        meta, model = read_metadata(path), model_for_summary(path)
        rows.append({
            "name": path.stem,
            "path": str(path),
            "architecture": model.arch_name,
            "arch_args": changed_args(model),
            "parameters": int(meta.get("parameters") or count_parameters(model)),
            "test_accuracy": (meta.get("metrics") or {}).get("test_accuracy"),
        })  # fmt: skip
    return rows


def layer_table(model: torch.nn.Module, input_size=(1, 3, 32, 32)) -> list[dict]:
    """One row per leaf layer, in execution order, like torchsummary's table. Works on meta-device models."""
    device = next(model.parameters(), torch.empty(0)).device
    stats = torchinfo_summary(model, input_size=input_size, verbose=0, device=device, mode="eval")
    # The module's dotted path ("blocks.1.conv1"): torchinfo's own name is the last part only, which read "0", "1"
    # inside a Sequential and "conv1" once per block.
    paths = {id(module): name for name, module in model.named_modules() if name}
    rows, seen = [], set()  # a module called twice (ResNet's ReLU) is said to be the same one
    for layer in stats.summary_list:
        if not layer.is_leaf_layer:
            continue
        rows.append({
            "layer": f"{layer.class_name}-{len(rows) + 1}",
            "name": paths.get(id(layer.module), layer.var_name) + (" (called again)" if id(layer.module) in seen else ""),
            "output_shape": list(layer.output_size)[1:] if layer.output_size else [],
            "parameters": int(layer.num_params or 0),
            "trainable": int(layer.trainable_params or 0),
        })  # fmt: skip
        seen.add(id(layer.module))
    return rows


def format_table(model: torch.nn.Module) -> str:
    rows = layer_table(model)
    lines = [f"{'Layer (type)':>28}  {'Output Shape':>20}  {'Param #':>12}", "=" * 66]
    for row in rows:
        lines.append(f"{row['layer']:>28}  {row['output_shape']!s:>20}  {row['parameters']:>12,}")
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    lines += ["=" * 66, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)
