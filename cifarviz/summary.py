"""A layer table (layer, type, output shape, parameters) for any zoo model, through torchinfo."""

from __future__ import annotations

import torch
from torchinfo import summary as torchinfo_summary

from .models import count_parameters


def layer_table(model: torch.nn.Module, input_size=(1, 3, 32, 32)) -> list[dict]:
    """One row per leaf layer, in execution order, like torchsummary's table."""
    stats = torchinfo_summary(model, input_size=input_size, verbose=0, device="cpu", mode="eval")
    rows = []
    for layer in stats.summary_list:
        if not layer.is_leaf_layer:
            continue
        rows.append({
            "layer": f"{layer.class_name}-{len(rows) + 1}",
            "name": layer.var_name,
            "output_shape": list(layer.output_size)[1:] if layer.output_size else [],
            "parameters": int(layer.num_params or 0),
            "trainable": int(layer.trainable_params or 0),
        })  # fmt: skip
    return rows


def format_table(model: torch.nn.Module) -> str:
    rows = layer_table(model)
    lines = [f"{'Layer (type)':>28}  {'Output Shape':>20}  {'Param #':>12}", "=" * 66]
    for row in rows:
        lines.append(f"{row['layer']:>28}  {str(row['output_shape']):>20}  {row['parameters']:>12,}")
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    lines += ["=" * 66, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(lines)
