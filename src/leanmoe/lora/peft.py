"""PEFT interop: expert adapters to and from PEFT's LoRA format for parameters (``LoraConfig(target_parameters=)``).

Legend: E experts, r rank, D model dim, I expert hidden dim, N gate/up rows; ``in``/``out`` are PEFT's features.

PEFT (``peft.tuners.lora.ParamWrapper``, peft 0.17+) adapts a 3-D parameter ``P [E, a, b]`` with one
``lora_A = nn.Linear(in, r*E)`` and one ``lora_B = nn.Linear(r*E, out)`` per parameter:
- ``lora_A.weight [E*r, in]`` is expert-major: ``A_e = lora_A.weight.view(E, r, in)[e]``;
- ``lora_B.weight [out, r*E]`` is rank-major: ``B_e = lora_B.weight.view(out, r, E)[:, :, e]``;
- ``(in, out) = (b, a)`` when the module has no true ``is_transposed`` flag (transformers' ``[E, out, in]``
  experts), and the delta is ``P[e] += s B_e A_e``; ``(in, out) = (a, b)`` when ``is_transposed`` is True
  (gpt-oss's ``[E, in, out]``), and ``P[e] += s (B_e A_e)^T``; ``s = lora_alpha / r``.
Several parameters of one module nest: the first targeted parameter in the module's registration order
(``gate_up_proj`` before ``down_proj``) is the innermost wrapper, so its keys carry one more ``base_layer.``:
``base_model.model.<path>.base_layer.lora_A.weight`` (gate_up) and ``base_model.model.<path>.lora_A.weight`` (down).

leanmoe's factors act on the ``[E, N, D]`` / ``[E, D, I]`` views (see :class:`leanmoe.ExpertLoRA`). Where PEFT's
delta is in leanmoe's orientation, ``A = A_e`` and ``B = B_e``; where it is transposed relative to leanmoe's view
(Llama 4: ``[E, D, 2I]`` storage and no ``is_transposed`` flag, so PEFT factors the transpose), ``A = B_e^T`` and
``B = A_e^T``. Either way the adapted weights are identical; docs/LORA.md lists the shapes per family.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn as nn

from leanmoe.lora.model import add_expert_lora, experts_modules, lora_modules
from leanmoe.lora.module import ExpertLoRA

_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def _param_names(lora_gated: bool) -> dict[str, str]:
    """leanmoe target -> the module's parameter name."""
    return {"gate_up": "gate_up_proj" if lora_gated else "up_proj", "down": "down_proj"}


def _orientation(module: Any, target: str, param: torch.Tensor) -> bool:
    """True when PEFT's ``B_e A_e`` is leanmoe's ``B A`` (False: it is its transpose)."""
    w = module.expert_weights()
    view = w.gate_up_proj if target == "gate_up" else w.down_proj
    view_transposed = tuple(view.shape) != tuple(param.shape) or view.stride() != param.stride()
    peft_swaps = param.dim() == 3 and not getattr(module, "is_transposed", False)
    return not (peft_swaps and view_transposed)


def _nesting(module: nn.Module, targeted: list[str]) -> dict[str, str]:
    """Parameter name -> the ``base_layer.`` prefix of its PEFT wrapper (first registered = innermost)."""
    order = [n for n, _ in module.named_parameters(recurse=False) if n in targeted]
    return {n: "base_layer." * (len(order) - 1 - i) for i, n in enumerate(order)}


def peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's expert adapters as PEFT would save them: ``(state_dict, adapter_config)``.

    ``state_dict`` keys are ``base_model.model.<path>.[base_layer.]lora_{A,B}.weight`` (no adapter name, as in
    ``adapter_model.safetensors``); ``adapter_config`` is the ``LoraConfig`` as a dict (``r``, ``lora_alpha``,
    ``target_parameters`` as full parameter paths, ``target_modules=[]``). Raises ``ValueError`` for a merged
    adapter, for adapters with different ranks or scales (one ``LoraConfig`` has one), or for LoRA dropout (PEFT's
    parameter wrappers refuse it).
    """
    found = lora_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no expert LoRA adapter (see leanmoe.lora.add_expert_lora)")
    ranks = {(lora.rank, lora.alpha) for _, _, lora in found}
    if len(ranks) != 1:
        raise ValueError(f"PEFT's LoraConfig has one rank and alpha; the adapters have (rank, alpha) in {ranks}")
    (rank, alpha), = ranks
    state, target_parameters = {}, []
    for path, module, lora in found:
        if lora.merged:
            raise ValueError(f"{path}: the adapter is merged into the base weights; unmerge_expert_lora first")
        if lora.dropout:
            raise ValueError(f"{path}: PEFT's parameter LoRA takes no dropout, got dropout={lora.dropout}")
        names = _param_names(lora.gated)
        prefixes = _nesting(module, [names[t] for t in lora.targets])
        E, r = lora.num_experts, lora.rank
        for target in lora.targets:
            pname = names[target]
            A, B = (t.detach() for t in lora.adapted(target))
            if not _orientation(module, target, getattr(module, pname)):
                A, B = B.transpose(-2, -1), A.transpose(-2, -1)
            key = f"{_PREFIX}{path + '.' if path else ''}{prefixes[pname]}"
            state[key + "lora_A.weight"] = A.reshape(E * r, A.shape[-1]).contiguous()
            state[key + "lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous()
            target_parameters.append(f"{path + '.' if path else ''}{pname}")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": [],
              "target_parameters": target_parameters, "lora_dropout": 0.0, "bias": "none", "use_rslora": False}
    return state, config


def save_peft_adapter(model: nn.Module, save_directory: str | os.PathLike, **config_kwargs) -> None:
    """Writes the expert adapters as a PEFT adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(model, save_directory)`` loads onto the
    same transformers model, unpatched. ``config_kwargs`` go to ``peft.LoraConfig`` (``base_model_name_or_path``,
    ``task_type``, ...). Needs peft (``pip install 'leanmoe[lora]'``)."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("save_peft_adapter needs peft >= 0.17: pip install 'leanmoe[lora]'") from e
    from safetensors.torch import save_file

    state, config = peft_state_dict(model)
    config.pop("peft_type")
    LoraConfig(**config, **config_kwargs).save_pretrained(os.fspath(save_directory))
    save_file({k: v.cpu() for k, v in state.items()}, os.path.join(save_directory, WEIGHTS_NAME))


def _matches(key: str, targets: list[str]) -> bool:
    # PEFT's rule for target_parameters: the full name, or a suffix after a dot.
    return any(key == t or key.endswith("." + t) for t in targets)


def load_peft_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], config: dict) -> nn.Module:
    """Loads a PEFT parameter-LoRA adapter (``state_dict`` as in ``adapter_model.safetensors``, ``config`` as in
    ``adapter_config.json``) into the model's expert adapters, adding them (with the config's ``r``) where missing;
    returns ``model``. The scale carries over exactly (``use_rslora``'s ``lora_alpha / sqrt(r)`` included).

    Raises ``ValueError`` for what leanmoe cannot represent: ``rank_pattern``/``alpha_pattern``, DoRA, LoRA biases,
    keys that are not expert parameters (``target_modules`` adapters), or shapes that do not fit.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"expected a PEFT LoRA adapter (peft_type 'LORA'), got {config.get('peft_type')!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ValueError(f"{field}={config[field]!r}: leanmoe's expert adapters take one rank and alpha")
    for field in ("use_dora", "lora_bias"):
        if config.get(field):
            raise ValueError(f"{field}=True is not supported for expert adapters")
    r, lora_alpha = int(config["r"]), float(config["lora_alpha"])
    alpha = lora_alpha * math.sqrt(r) if config.get("use_rslora") else lora_alpha  # so that alpha / r matches
    targets = list(config.get("target_parameters") or [])
    state = {k.removeprefix(_PREFIX): v for k, v in state_dict.items()}
    used: set[str] = set()
    plan = []
    for path, module in experts_modules(model):
        lora_gated = module.expert_weights().activation.gated
        names = _param_names(lora_gated)
        wanted = [t for t in ("gate_up", "down") if _matches(f"{path + '.' if path else ''}{names[t]}", targets)]
        if wanted:
            plan.append((path, module, wanted))
    if not plan:
        raise ValueError(f"target_parameters={targets!r} matches no expert parameter of {type(model).__name__}")
    for path, module, wanted in plan:
        lora: Any = module._modules.get("lora")
        if lora is None:
            add_expert_lora(module, rank=r, alpha=alpha, targets=tuple(wanted))
            lora = module.lora
        if not isinstance(lora, ExpertLoRA) or lora.rank != r or set(lora.targets) != set(wanted) or lora.merged:
            raise ValueError(f"{path}: has an adapter that does not fit the PEFT config (rank {r}, targets "
                             f"{tuple(wanted)}, unmerged)")
        lora.alpha = alpha
        names = _param_names(lora.gated)
        prefixes = _nesting(module, [names[t] for t in wanted])
        E = lora.num_experts
        for target in wanted:
            pname = names[target]
            key = f"{path + '.' if path else ''}{prefixes[pname]}"
            missing = [key + s for s in ("lora_A.weight", "lora_B.weight") if key + s not in state]
            if missing:
                raise ValueError(f"the PEFT state dict has no {missing} for {path}.{pname}")
            wA, wB = state[key + "lora_A.weight"], state[key + "lora_B.weight"]
            A_dst, B_dst = lora.adapted(target)
            A = wA.reshape(E, r, wA.shape[-1])
            B = wB.reshape(wB.shape[0], r, E).permute(2, 0, 1)
            if not _orientation(module, target, getattr(module, pname)):
                A, B = B.transpose(-2, -1), A.transpose(-2, -1)
            if A.shape != A_dst.shape or B.shape != B_dst.shape:
                raise ValueError(f"{path}.{pname}: PEFT factors map to A {list(A.shape)}, B {list(B.shape)}; the "
                                 f"adapter needs {list(A_dst.shape)}, {list(B_dst.shape)}")
            with torch.no_grad():
                A_dst.copy_(A)
                B_dst.copy_(B)
            used.update((key + "lora_A.weight", key + "lora_B.weight"))
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"the PEFT adapter has keys that are not expert parameter adapters: {unused[:4]}"
                         f"{' ...' if len(unused) > 4 else ''}")
    return model


def load_peft_adapter(model: nn.Module, adapter_directory: str | os.PathLike) -> nn.Module:
    """:func:`load_peft_state_dict` from a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them). Needs no peft."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter_directory, CONFIG_NAME)) as f:
        config = json.load(f)
    device = next(model.parameters()).device
    return load_peft_state_dict(model, load_file(os.path.join(adapter_directory, WEIGHTS_NAME),
                                                 device=str(device)), config)
