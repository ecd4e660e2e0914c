"""Reversible attribute and dict patches: every change the stand-in makes is recorded here and
undone, in reverse order, by ``Patcher.restore`` (``uninstall_torch_npu_shim``)."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, MutableMapping

__all__ = ["Patcher"]

_MISSING = object()


class Patcher:
    """Sets attributes / mapping items and remembers what was there before."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._attrs: list[tuple[Any, str, Any, Any]] = []  # (owner, name, old, new) of setattr

    def __len__(self) -> int:
        return len(self._undo)

    def setattr(self, owner: Any, name: str, value: Any) -> Any:
        """``owner.name = value``; restore puts back the previous value (or removes the attribute
        when ``owner`` did not define it itself, so an inherited one shows through again)."""
        own = owner.__dict__ if isinstance(owner, type) else getattr(owner, "__dict__", {})
        old = own.get(name, _MISSING)
        setattr(owner, name, value)
        self._attrs.append((owner, name, old, value))

        def undo() -> None:
            if old is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, old)
        self._undo.append(undo)
        return value

    def setitem(self, mapping: MutableMapping, key: Any, value: Any) -> Any:
        old = mapping.get(key, _MISSING)
        mapping[key] = value

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old
        self._undo.append(undo)
        return value

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The original attributes for the duration of the block (the patches come back after)."""
        done = []
        try:
            for owner, name, old, new in reversed(self._attrs):
                if getattr(owner, name, _MISSING) is not new:
                    continue
                if old is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, old)
                done.append((owner, name, new))
            yield
        finally:
            for owner, name, new in reversed(done):
                setattr(owner, name, new)

    def on_restore(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when restoring (for changes that are not an attribute or an item)."""
        self._undo.append(fn)

    def restore(self) -> None:
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep restoring the rest
                errors.append(e)
        if errors:
            raise RuntimeError(f"fascore.compat: {len(errors)} patch(es) could not be undone: {errors[0]!r}")


def wrap_found_spec(finder: Any, fullname: str, path: Any, target: Any, wrap: Callable[[Any], Any]) -> Any:
    """For a meta-path hook: the spec the other finders on ``sys.meta_path`` give ``fullname``,
    with its loader replaced by ``wrap(loader)`` where the loader can execute modules; None when
    no other finder has it."""
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, path, target)
        if spec is not None:
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = wrap(spec.loader)
            return spec
    return None
