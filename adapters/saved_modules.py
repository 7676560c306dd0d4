"""Fully trained modules (PEFT's ``modules_to_save``): an adapter's own copy of the token embedding
or of lm_head, which replaces the base model's for that adapter's rows.

Such a copy is as large as the base layer (vocab x hidden values), far more than an adapter's
pages, so it is not paged: registration converts it into the served dtype on the model's device,
and it is held while a registered adapter version holds it. ``--max-saved-modules`` bounds the
copies held; a registration that would pass it is refused, naming the flag. Files registered again
(a replace with the same weights, a second id for the same folder) share the copies they already
have, and a copy equal to the base layer is not held at all (it changes nothing). Requests still
running on a version that was unregistered or replaced keep its copies until they end.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch

from .errors import AdapterInvalid, SavedModulesFull, clip


class SavedModule:
    """One held copy: ``weight`` [vocab, hidden] in the served dtype, on the model's device."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


class SavedModules(dict):
    """module name -> its held copy, for one registration: what it holds until ``release``d."""

    def __init__(self, modules: dict[str, SavedModule] | None = None, keys: tuple = ()):
        super().__init__(modules or {})
        self.keys_held = keys  # (weights sha256, module) of each copy counted for it
        self.released = False


class SavedModuleStore:
    """The copies registrations hold, keyed by (weights sha256, module name), each counted once
    however many registrations share it."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: dict[tuple[str, str], SavedModule] = {}
        self._holders: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # registrations run on several threads, and /metrics reads

    def _distinct(self) -> list[SavedModule]:
        with self._lock:
            return list({id(m): m for m in self._held.values()}.values())

    def __len__(self) -> int:
        return len(self._distinct())

    @property
    def nbytes(self) -> int:
        return sum(m.weight.numel() * m.weight.element_size() for m in self._distinct())

    def hold(self, digest: str, saved: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
             replacing: SavedModules | None = None) -> SavedModules:
        """``saved``: module -> the adapter's copy as the file holds it (any float dtype);
        ``base``: module -> the served weight it replaces. Returns module -> its held copy, for
        the copies that differ from the served weight; copies of one adapter that are equal
        (a tied embedding and lm_head saved twice) share one. ``replacing``: the copies of the
        version this registration replaces, released once it commits, so not counted against it.
        Raises AdapterInvalid (a NaN or Inf once cast) and SavedModulesFull (past
        --max-saved-modules)."""
        with self._lock:  # held across the conversion: registrations are rare, and must not pass the bound together
            out: dict[str, SavedModule] = {}
            new: list[SavedModule] = []
            for module, tensor in saved.items():
                found = self._held.get((digest, module))
                if found is not None:
                    out[module] = found
                    continue
                served = base[module]
                weight = tensor.to(device=served.device, dtype=served.dtype, copy=True)
                if not torch.isfinite(weight).all():
                    raise AdapterInvalid(f"the fully trained {clip(module)} (modules_to_save) has NaN or Inf weights "
                                         f"once cast to {str(served.dtype).removeprefix('torch.')}")
                if torch.equal(weight, served):  # not trained after all: the base layer serves it
                    continue
                twin = next((m for m in out.values() if torch.equal(m.weight, weight)), None)
                if twin is None:
                    twin = SavedModule(weight)
                    new.append(twin)
                out[module] = twin
            going = {id(self._held[k]) for k in (replacing.keys_held if replacing else ()) if self._holders[k] == 1}
            count = len({id(m) for m in self._held.values()} - going)
            if new and count + len(new) > self.limit:
                raise SavedModulesFull(
                    f"the adapter's fully trained modules (modules_to_save) need {len(new)} more held "
                    f"cop{'y' if len(new) == 1 else 'ies'} of a base layer; {count} of --max-saved-modules "
                    f"{self.limit} are held")
            keys = tuple((digest, module) for module in out)
            for key, held in zip(keys, out.values(), strict=True):
                self._held[key] = held
            self._holders.update(keys)
            return SavedModules(out, keys)

    def release(self, held: SavedModules) -> None:
        """A registration that held ``held`` is gone (unregistered, replaced, or refused after
        ``hold``): copies no registration holds any more are no longer counted."""
        with self._lock:
            if held.released:
                return
            held.released = True
            for key in held.keys_held:
                self._holders[key] -= 1
                if self._holders[key] <= 0:
                    del self._holders[key]
                    self._held.pop(key, None)
