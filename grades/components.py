"""Which weight matrices GradES watches: component discovery by name patterns.

A *component* is the unit that gets frozen: one attention or MLP projection matrix, or the LoRA
A/B pair that adapts one such projection. Discovery walks ``model.named_modules()`` and matches
module names against patterns for the common transformer families:

* Llama / Qwen / Mistral / Gemma / Phi-3: ``q_proj k_proj v_proj o_proj`` (attention) and
  ``gate_proj up_proj down_proj`` (MLP); fused ``qkv_proj`` / ``gate_up_proj`` too.
* Phi-1/2: ``self_attn.dense`` (attention output), ``mlp.fc1 mlp.fc2``.
* GPT-NeoX / Pythia, Falcon, BLOOM: ``query_key_value`` and ``attention.dense`` /
  ``self_attention.dense`` (attention), ``dense_h_to_4h dense_4h_to_h`` (MLP).
* GPT-2 (``Conv1D`` layers): ``attn.c_attn attn.c_proj`` and ``mlp.c_fc mlp.c_proj``.
* BERT / RoBERTa / ViT: ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense`` and the layer's ``output.dense``.
* CLIP / SigLIP-style vision towers: ``q_proj k_proj v_proj out_proj`` and ``fc1 fc2``;
  Qwen2-VL / Qwen2.5-VL vision blocks: ``attn.qkv attn.proj`` and ``mlp.fc1 mlp.fc2`` (or
  ``gate_proj up_proj down_proj``).
* PEFT LoRA: for every adapted module, its ``lora_A`` and ``lora_B`` weights of one adapter form
  one component named after the adapted module; the frozen base weights are not components.

Only the 2-D ``weight`` of a matched module is tracked (no biases, norms or embeddings), and only
parameters that require gradients when discovery runs. Pass your own patterns (regular
expressions searched in *parameter* names, grouped by component type) to track anything else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

#: Default module-name patterns (``re.search``) per component type, tried in this order.
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "attention": (
        r"(^|\.)(q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|query_key_value|Wqkv)$",
        r"(^|\.)(self_attn|attention|self_attention)\.dense$",
        r"(^|\.)attn\.(c_attn|c_proj|q_attn|qkv|proj)$",
        r"(^|\.)attention\.(self|attention)\.(query|key|value)$",
        r"(^|\.)attention\.output\.dense$",
    ),
    "mlp": (
        r"(^|\.)(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|dense_h_to_4h|dense_4h_to_h)$",
        r"(^|\.)mlp\.(c_fc|c_proj)$",
        r"(^|\.)intermediate\.dense$",
        r"(^|\.)(?<!attention\.)output\.dense$",
    ),
}

PatternsLike = Mapping[str, Union[str, Sequence[str]]]


@dataclass
class Component:
    """One frozen-together unit.

    Attributes:
        name: the module (or parameter) name it is known by, e.g.
            ``"model.layers.0.self_attn.q_proj"``.
        type: ``"attention"``, ``"mlp"`` or a user-chosen type name.
        param_names: names of its parameters in ``model.named_parameters()`` order
            (one weight, or the LoRA A and B weights).
        params: the parameter tensors themselves (not shown in ``repr``).
    """

    name: str
    type: str
    param_names: tuple[str, ...]
    params: list[torch.Tensor] = field(repr=False, default_factory=list, compare=False)

    @property
    def numel(self) -> int:
        """Total number of elements of the component's parameters (global size if sharded)."""
        return int(sum(p.numel() for p in self.params))

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "param_names": list(self.param_names),
                "numel": self.numel}


def _compile(patterns: PatternsLike) -> list[tuple[str, re.Pattern]]:
    if not isinstance(patterns, Mapping):
        raise TypeError("patterns must be a mapping {component type: regex or list of regexes}, "
                        f"got {type(patterns).__name__}")
    out = []
    for typ, pats in patterns.items():
        if not isinstance(typ, str) or not typ:
            raise TypeError(f"component type names must be non-empty strings, got {typ!r}")
        if isinstance(pats, str):
            pats = (pats,)
        for p in pats:
            try:
                out.append((typ, re.compile(p)))
            except re.error as e:
                raise ValueError(f"invalid pattern {p!r} for component type {typ!r}: {e}") from None
    return out


def _classify(name: str, compiled: list[tuple[str, re.Pattern]]) -> Optional[str]:
    for typ, rx in compiled:
        if rx.search(name):
            return typ
    return None


def _lora_components(model: nn.Module, compiled) -> list[Component]:
    """One component per (LoRA-adapted module, adapter): its trainable lora_A + lora_B weights."""
    comps = []
    for mname, mod in model.named_modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict):
            continue
        base = re.sub(r"(^|\.)base_model\.model\.", r"\1", mname)
        typ = _classify(base, compiled) or "other"
        for adapter in la.keys():
            if adapter not in lb:
                continue
            wa, wb = getattr(la[adapter], "weight", None), getattr(lb[adapter], "weight", None)
            if not isinstance(wa, torch.Tensor) or not isinstance(wb, torch.Tensor):
                continue
            if not (wa.requires_grad or wb.requires_grad):
                continue
            prefix = f"{mname}." if mname else ""
            names = (f"{prefix}lora_A.{adapter}.weight", f"{prefix}lora_B.{adapter}.weight")
            cname = mname if len(la) == 1 else f"{mname}[{adapter}]"
            comps.append(Component(cname, typ, names, [wa, wb]))
    return comps


def _seen_names(model: nn.Module, limit: int = 20) -> str:
    names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    shown = ", ".join(names[:limit])
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return (shown + more) if names else "(no modules with parameters)"


def discover_components(model: nn.Module, patterns: Optional[PatternsLike] = None) -> list[Component]:
    """Find the components of ``model`` that GradES should watch.

    Args:
        model: any ``nn.Module`` (a transformers model, a PEFT model, a plain module).
        patterns: ``None`` for the defaults (:data:`DEFAULT_PATTERNS`, matched against module
            names, 2-D weights only, LoRA pairs when the model has LoRA adapters), or a mapping
            ``{type: regex | [regex, ...]}`` searched in full *parameter* names: every matching
            trainable parameter becomes its own component (LoRA A/B weights of one adapted module
            are still paired), whatever its shape.

    Returns:
        Components in module order.

    Raises:
        ValueError: nothing matched; the message lists the module names that were seen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if patterns is None:
        compiled = _compile(DEFAULT_PATTERNS)
        comps = _lora_components(model, compiled)
        if not comps:
            for mname, mod in model.named_modules():
                w = getattr(mod, "weight", None)
                if not isinstance(w, nn.Parameter) or w.dim() != 2 or not w.requires_grad:
                    continue
                if not any(w is p for p in mod.parameters(recurse=False)):
                    continue
                typ = _classify(mname, compiled)
                if typ is not None:
                    comps.append(Component(mname, typ, (f"{mname}.weight",), [w]))
        what = "default attention/MLP patterns"
    else:
        compiled = _compile(patterns)
        comps = []
        lora_groups: dict[str, Component] = {}
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            typ = _classify(pname, compiled)
            if typ is None:
                continue
            m = re.match(r"^(.*)\.lora_([AB])\.([^.]+)\.weight$", pname)
            if m:
                key = f"{m.group(1)}[{m.group(3)}]"
                comp = lora_groups.get(key)
                if comp is None:
                    comp = Component(m.group(1), typ, (), [])
                    lora_groups[key] = comp
                    comps.append(comp)
                comp.param_names = comp.param_names + (pname,)
                comp.params.append(p)
            else:
                comps.append(Component(pname, typ, (pname,), [p]))
        what = "patterns " + ", ".join(f"{t}: {rx.pattern}" for t, rx in compiled)
    if not comps:
        raise ValueError(f"GradES found no trainable components in {type(model).__name__} with the {what}. "
                         f"Modules seen: {_seen_names(model)}. Pass patterns={{'type': [regex, ...]}} "
                         "(searched in parameter names) or an explicit components list.")
    seen: dict[int, str] = {}
    for c in comps:
        for p in c.params:
            if id(p) in seen:
                raise ValueError(f"parameter of component {c.name!r} is also in component {seen[id(p)]!r}; "
                                 "each parameter may belong to one component only")
            seen[id(p)] = c.name
    return comps


def resolve_components(model: nn.Module, components: Union[None, PatternsLike, Iterable[Component]]
                       ) -> list[Component]:
    """``components`` as given to :class:`~grades.GradES`: ``None`` (defaults), a patterns mapping,
    or an explicit list of :class:`Component` objects (checked to belong to ``model``)."""
    if components is None or isinstance(components, Mapping):
        return discover_components(model, components)
    comps = list(components)
    if not comps:
        raise ValueError("components is an empty list: GradES needs at least one component to watch")
    own = {id(p) for p in model.parameters()}
    for c in comps:
        if not isinstance(c, Component):
            raise TypeError(f"components must be Component objects, got {type(c).__name__}")
        if not c.params:
            raise ValueError(f"component {c.name!r} has no parameters")
        for p in c.params:
            if id(p) not in own:
                raise ValueError(f"a parameter of component {c.name!r} is not a parameter of the model")
    return comps


__all__ = ["Component", "DEFAULT_PATTERNS", "discover_components", "resolve_components"]
