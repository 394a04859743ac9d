"""A hook set that is always removed: the one way phases attach PyTorch hooks to a model."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch


class HookSet:
    """Collects hook handles and removes every one of them on exit, also when the body raises.

    >>> with HookSet() as hooks:
    ...     hooks.pre(block, add_vector)      # forward pre-hook (kwargs-aware)
    ...     hooks.post(block, record_output)  # forward hook
    ...     model(**batch)
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: torch.nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = True) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: torch.nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
