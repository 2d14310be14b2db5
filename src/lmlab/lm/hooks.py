"""Read and write activations by module name, with context managers over PyTorch forward hooks.

A hook point is a module name as ``model.named_modules()`` spells it (HF Llama: ``model.layers.3``,
``model.layers.3.mlp``, ``model.norm``, ``lm_head``). Every context manager here resolves all its names
before registering anything, raises :class:`~lmlab.errors.ConfigError` naming the closest real names when
one does not resolve, and removes every handle it registered when the block exits, also on an exception.

- :func:`capture`: record a module's output (or first input) on each forward.
- :func:`modify`: replace a module's output (or first input) by ``fn(tensor)``.
- :func:`add_vector`: add a steering vector at chosen token positions (used by activation addition).
- :func:`resolve`, :func:`layer_names`: look up modules by name or by a per-component glob.

Modules that return a tuple, list or ``ModelOutput`` (dict-like) are read and written through their
first element, the hidden states for HF decoder layers. Shape legend: B batch, T tokens, D width.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from lmlab.errors import ConfigError

Where = Literal["output", "input"]
Positions = slice | int | Sequence[int] | torch.Tensor


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; ConfigError listing up to 5 close names when there is none.

    Every name a module is reachable by resolves, also the second name of a shared (tied, aliased) module,
    which ``named_modules()`` lists only once.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"closest: {', '.join(close)}" if close else f"names look like: {', '.join(list(modules)[1:6])}"
    raise ConfigError(f"no module named {name!r} in {type(model).__name__} ({hint}); "
                      "list them with lmlab.lm.hooks.layer_names(model, '*')")


def layer_names(model: nn.Module, pattern: str) -> list[str]:
    """Module names matching ``pattern``, in model order; ``*`` and ``?`` match within one dotted component.

    ``"model.layers.*"`` gives the decoder layers only (not their submodules); ``"model.layers.*.mlp"`` their
    MLPs. Raises ConfigError when nothing matches.
    """
    parts = pattern.split(".")
    names = [name for name, _ in model.named_modules() if name and _matches(name.split("."), parts)]
    if not names:
        raise ConfigError(f"no module name matches {pattern!r} in {type(model).__name__} "
                          "(* matches within one dotted component, e.g. 'model.layers.*.mlp')")
    return names


def _matches(name_parts: list[str], pattern_parts: list[str]) -> bool:
    return len(name_parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(n, p) for n, p in zip(name_parts, pattern_parts, strict=True))


def _first_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value and isinstance(next(iter(value.values())), torch.Tensor):
        return next(iter(value.values()))
    raise ConfigError(f"module {name!r} gives a {type(value).__name__}; hooks need a tensor or a tuple, list or "
                      "ModelOutput whose first element is a tensor: pick another module")


def _replace_first(value, new: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple | list):
        return type(value)([new, *value[1:]])
    value[next(iter(value))] = new  # ModelOutput / dict: set the first field in place
    return value


def _first_input(name: str, args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """Where a module's first input is: (0, tensor) when positional, else (keyword, tensor)."""
    if args:
        return 0, _first_tensor(name, args[0])
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    raise ConfigError(f"module {name!r} was called without a tensor input to hook")


@contextlib.contextmanager
def _hooked(model: nn.Module, hooks: dict[str, Callable], where: Where) -> Iterator[None]:
    """Register ``hooks[name]`` on each named module (forward hook, or pre-hook with kwargs); always remove."""
    if where not in ("output", "input"):
        raise ConfigError(f"where/what must be 'output' or 'input'; got {where!r}")
    modules = {name: resolve(model, name) for name in hooks}  # all names resolve before any hook exists
    handles = []
    try:
        for name, hook in hooks.items():
            if where == "output":
                handles.append(modules[name].register_forward_hook(hook))
            else:
                handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Capture(Mapping):
    """Captured activations: ``cap[name]`` is the last tensor seen (or, with ``keep_all``, a list of all).

    Only names whose module has run appear as keys. The tensors stay valid after the ``with`` block.
    """

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self._data: dict[str, torch.Tensor | list[torch.Tensor]] = {}

    def _record(self, name: str, tensor: torch.Tensor) -> None:
        if self.keep_all:
            self._data.setdefault(name, []).append(tensor)
        else:
            self._data[name] = tensor

    def __getitem__(self, name: str) -> torch.Tensor | list[torch.Tensor]:
        if name not in self._data:
            raise KeyError(f"nothing captured at {name!r}: run the model inside the `with capture(...)` block")
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@contextlib.contextmanager
def capture(model: nn.Module, names: str | Sequence[str], *, what: Where = "output", detach: bool = True,
            keep_all: bool = False) -> Iterator[Capture]:
    """Record the output (or first input) of each named module on every forward inside the block.

    Tuple/ModelOutput outputs are recorded through their first element. ``detach`` drops the autograd graph
    (the tensor is not copied). Usage::

        with capture(model, "model.layers.0") as cap:
            model(input_ids)
        h = cap["model.layers.0"]  # (B, T, D)
    """
    names = [names] if isinstance(names, str) else list(names)
    cap = Capture(keep_all)

    def make_hook(name: str) -> Callable:
        def keep(tensor: torch.Tensor) -> None:
            cap._record(name, tensor.detach() if detach else tensor)

        if what == "output":
            return lambda module, args, output: keep(_first_tensor(name, output))
        return lambda module, args, kwargs: keep(_first_input(name, args, kwargs)[1])

    with _hooked(model, {name: make_hook(name) for name in names}, what):
        yield cap


@contextlib.contextmanager
def modify(model: nn.Module, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], *,
           where: Where = "output") -> Iterator[None]:
    """Replace each named module's output (or first input) by ``fn(tensor)`` for forwards inside the block.

    With tuple/ModelOutput outputs only the first element is replaced. ``fn`` should return a new tensor
    rather than edit its argument in place (other hooks or autograd may hold the original).
    """

    def make_hook(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def on_output(module, args, output):
            return _replace_first(output, fn(_first_tensor(name, output)))

        def on_input(module, args, kwargs):
            where_, tensor = _first_input(name, args, kwargs)
            if where_ == 0:
                return (_replace_first(args[0], fn(tensor)), *args[1:]), kwargs
            return args, {**kwargs, where_: fn(tensor)}

        return on_output if where == "output" else on_input

    with _hooked(model, {name: make_hook(name, fn) for name, fn in edits.items()}, where):
        yield


def _as_positions(positions: Positions) -> slice | list[int]:
    """A slice as it is; an int, list or tensor of ints as a list (converted once, not on every forward call)."""
    if isinstance(positions, slice):
        return positions
    return [int(p) for p in torch.as_tensor(positions).flatten().tolist()]


@contextlib.contextmanager
def add_vector(model: nn.Module, name: str, vector: torch.Tensor, *, positions: Positions = slice(None),
               coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` (D,) to the named module's output (B, T, D) at token ``positions``, every row.

    ``positions`` index the T axis of each forward call (a slice, an int, or a list/tensor of ints); under
    cached generation a decoding step's forward sees only the new token, at position 0. Positions a call does not
    have (an int or list entry >= its T, or < -T) are skipped in that call, as a slice would skip them: steering
    the prompt's positions leaves the shorter decoding steps alone.
    """
    if vector.dim() != 1:
        raise ConfigError(f"add_vector needs a 1-D (D,) vector; got shape {tuple(vector.shape)}")
    delta = coeff * vector.detach()
    wanted = _as_positions(positions)

    def steer(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != delta.shape[0]:
            raise ConfigError(f"add_vector: {name!r} gives shape {tuple(hidden.shape)}, expected (B, T, "
                              f"{delta.shape[0]}): pick a module whose output is the hidden states")
        t = hidden.shape[1]  # a slice clips by itself; listed positions this call does not have are skipped
        at = wanted if isinstance(wanted, slice) else [p for p in wanted if -t <= p < t]
        hidden = hidden.clone()
        hidden[:, at] += delta.to(device=hidden.device, dtype=hidden.dtype)
        return hidden

    with modify(model, {name: steer}):
        yield
