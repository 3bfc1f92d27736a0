"""The engine's linears inside a transformers model: every ``nn.Linear`` replaced, whatever the architecture.

:func:`replace_linears` swaps each ``nn.Linear`` of the model for an :class:`EngineLinear` that calls
one of :mod:`.quant`'s linears (oneDNN-packed float, or weight-only int8 / int4), so the model's
own forward runs the engine's kernels. Sibling projections that read the same input (``q_proj``,
``k_proj``, ``v_proj``; ``gate_proj``, ``up_proj``) are fused into one matmul, as ``LlamaRunner``
does: the first sibling called computes all of them, the others take their slice. The cached
result is used only for the very tensor it was computed from (same object, and the same version
counter where torch keeps one: not for inference-mode tensors), so a model calling them in another
order or on other inputs stays correct; it is dropped once the last sibling has read it.

The LM head gets its own quantization (int8 in both int modes); mixture-of-experts routers stay in
float; weights that are not ``nn.Linear`` (fused 3-D expert tensors, embeddings) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_server.engine.quant import Linear, make_linear

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place modification counter (inference tensors have none: -2)."""
    return -2 if x.is_inference() else int(x._version)


class _SharedInput:
    """One fused linear for sibling projections called on the same input."""

    def __init__(self, linear: Linear, widths: Sequence[int]) -> None:
        self.linear = linear
        self.widths = list(widths)
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        version = _version(x)
        if x is not self._input or version != self._version:
            self._outputs = tuple(o.contiguous() for o in self.linear(x).split(self.widths, dim=-1))
            self._input, self._version = x, version
        out = self._outputs[index]
        if index == len(self.widths) - 1:  # the usual last caller: let the input go
            self._input, self._outputs = None, ()
        return out


class EngineLinear(torch.nn.Module):
    """An ``nn.Linear`` replaced by one of the engine's linears (the model's own forward calls it)."""

    def __init__(self, linear: Linear | _SharedInput, index: int, in_features: int, out_features: int,
                 weight: torch.Tensor | None) -> None:
        super().__init__()
        self.linear = linear
        self.index = index  # this projection's slice of a fused linear
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # the original (tied heads, code reading ``.weight.dtype``); None once freed

    @property
    def kernel(self) -> Linear:
        """The engine's linear doing the work (for a fused projection: the fused one)."""
        return self.linear.linear if isinstance(self.linear, _SharedInput) else self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.linear, _SharedInput):
            return self.linear.output(x, self.index)
        return self.linear(x)


def _is_router(name: str, module: torch.nn.Linear, experts: int | None) -> bool:
    """A mixture-of-experts router: kept in float (its top-k choice is sensitive to rounding)."""
    last = name.rsplit(".", 1)[-1]
    return "router" in last or last == "gate" or (experts is not None and module.out_features == experts)


def _sibling_groups(model: torch.nn.Module, skip: set[int]) -> list[list[str]]:
    """Names of the sibling projections to fuse: plain linears of one parent, same input width and dtype,
    all with a bias or none."""
    groups: list[list[str]] = []
    for parent_name, parent in model.named_modules():
        for names in FUSED_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is torch.nn.Linear and id(m) not in skip for m in members):
                continue
            linears: list[torch.nn.Linear] = members  # type: ignore[assignment]
            if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) == 1:
                groups.append([f"{parent_name}.{n}" if parent_name else n for n in names])
    return groups


def _set(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def replace_linears(
    model: torch.nn.Module, pack: bool, quantization: str | None, head_quantization: str | None, free: bool
) -> int:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`EngineLinear` (see the module docstring).
    ``free``: drop the module's own weight once re-laid (the model is the engine's alone). Returns the
    bytes of the weights the replaced linears read."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    modules = dict(model.named_modules())
    total = 0
    for group in _sibling_groups(model, {id(head)}):
        members = [modules[n] for n in group]
        weight = torch.cat([m.weight.detach() for m in members])
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        shared = _SharedInput(make_linear(weight, bias, pack, quantization), [m.out_features for m in members])
        total += shared.linear.weight_bytes
        for index, (name, m) in enumerate(zip(group, members, strict=True)):
            _set(model, name, EngineLinear(shared, index, m.in_features, m.out_features,
                                           None if free else m.weight.detach()))
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        mode = head_quantization if module is head else (None if _is_router(name, module, experts) else quantization)
        weight = module.weight.detach()
        linear = make_linear(weight, None if module.bias is None else module.bias.detach(), pack, mode)
        total += linear.weight_bytes
        _set(model, name, EngineLinear(linear, 0, module.in_features, module.out_features, None if free else weight))
    return total


def body_linears(model: torch.nn.Module) -> list[Linear]:
    """The engine's linears that :func:`replace_linears` put in ``model``, its LM head left out (a
    fused projection's once)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    kernels = {id(m.kernel): m.kernel for m in model.modules() if isinstance(m, EngineLinear) and m is not head}
    return list(kernels.values())


def streamed_linears(model: torch.nn.Module) -> list[Linear]:
    """The engine's linears in ``model`` in module order, its LM head last (what a decode step reads)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return body_linears(model) + ([head.kernel] if isinstance(head, EngineLinear) else [])


__all__ = ["EngineLinear", "body_linears", "replace_linears", "streamed_linears"]
