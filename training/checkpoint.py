"""Checkpoints without pickle: weights and optimizer tensors as safetensors, the rest as JSON.

A checkpoint folder holds the model (``save_pretrained``: config + safetensors + processor),
``trainer_state.safetensors`` (optimizer moments, RNG state) and ``trainer_state.json`` (step,
data position, optimizer hyper-parameters, the resolved config, the metrics so far).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | Path, policy, opt: torch.optim.Optimizer, state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save(folder)
    tensors, meta = optimizer_to_flat(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps({**state, "optimizer": meta}, indent=1, default=float))
    return folder


def load_trainer_state(folder: str | Path, opt: torch.optim.Optimizer) -> dict:
    folder = Path(folder)
    tensors = load_file(str(folder / STATE_TENSORS))
    state = json.loads((folder / STATE_JSON).read_text())
    optimizer_from_flat(opt, tensors, state.pop("optimizer"))
    torch.set_rng_state(tensors["rng.torch"])
    return state
