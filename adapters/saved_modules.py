"""Fully trained modules (PEFT's ``modules_to_save``): an adapter's own copy of the token embedding
or of lm_head, which replaces the base model's for that adapter's rows.

Such a copy is as large as the base layer (vocab x hidden values), far more than an adapter's
pages, so it is not paged: registration converts it into the served dtype on the model's device
and the adapter's manifest holds it for as long as the adapter version is registered or a request
holds it. ``--max-saved-modules`` bounds how many are held at once; a registration that would pass
it is refused, naming the flag. Files registered again (a replace with the same weights, a second
id for the same folder) share the copy they already have, and a copy equal to the base layer is
not held at all (it changes nothing).
"""

from __future__ import annotations

import gc
import threading
import weakref

import torch

from .errors import AdapterInvalid, AdapterNoRoom, clip


class SavedModule:
    """One held copy: ``weight`` [vocab, hidden] in the served dtype, on the model's device."""

    __slots__ = ("weight", "__weakref__")

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


class SavedModuleStore:
    """The copies held now, keyed by (weights sha256, module name); a copy is counted for as long
    as anything holds it (a registered version, or a request of a replaced one)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held: weakref.WeakValueDictionary[tuple[str, str], SavedModule] = weakref.WeakValueDictionary()
        self._lock = threading.RLock()  # registrations run on several threads, and /metrics reads

    def _distinct(self) -> list[SavedModule]:
        with self._lock:
            return list({id(m): m for m in self._held.values()}.values())

    def __len__(self) -> int:
        return len(self._distinct())

    @property
    def nbytes(self) -> int:
        return sum(m.weight.numel() * m.weight.element_size() for m in self._distinct())

    def hold(self, digest: str, saved: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, SavedModule]:
        """``saved``: module -> the adapter's copy as the file holds it (any float dtype);
        ``base``: module -> the served weight it replaces. Returns module -> its held copy, for
        the copies that differ from the served weight; copies of one adapter that are equal
        (a tied embedding and lm_head saved twice) share one. Raises AdapterInvalid (a NaN or Inf
        once cast) and AdapterNoRoom (past --max-saved-modules)."""
        with self._lock:
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
            if new and len(self) + len(new) > self.limit:
                gc.collect()  # copies that only garbage (a finished request's reference cycle) still holds
            if new and len(self) + len(new) > self.limit:
                raise AdapterNoRoom(
                    f"the adapter's fully trained modules (modules_to_save) need {len(new)} more held "
                    f"cop{'y' if len(new) == 1 else 'ies'} of a base layer; {len(self)} of --max-saved-modules "
                    f"{self.limit} are held")
            for module, held in out.items():
                self._held[(digest, module)] = held
            return out
