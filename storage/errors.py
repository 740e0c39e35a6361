"""What can go wrong with a store, each said in one line."""

from __future__ import annotations

from collections.abc import Iterable


class StoreError(Exception):
    """Base of the store's errors; str() is one clear line for the user."""


class NotAStore(StoreError):
    pass


class StoreLocked(StoreError):
    pass


class FormatMismatch(StoreError):
    pass


class UnknownCheckpoint(StoreError):
    pass


class MissingPage(StoreError):
    pass


class StoreFull(StoreError):
    """The store cannot take more (no space, quota, I/O error): what is stored stays sound."""


REPAIR_HINT = "`vmckpt check` says what is damaged, `vmckpt check --repair` salvages the rest"


class Damaged(StoreError):
    """Part of the store does not read back as it was written: a checksum that does not match,
    a truncated or lost file. what: what is wrong, said without the store; checkpoints: those
    known to be hit (empty: not known here)."""

    def __init__(self, store: object, what: str, checkpoints: tuple[int, ...] = (),
                 hint: str = REPAIR_HINT) -> None:
        super().__init__(f"store {store} is damaged: {what}; {hint}")
        self.store, self.what, self.checkpoints = store, what, checkpoints


def id_ranges(ids: Iterable[int]) -> str:
    """1 2 3 5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for ckpt in sorted(ids):
        if spans and spans[-1][1] + 1 == ckpt:
            spans[-1][1] = ckpt
        else:
            spans.append([ckpt, ckpt])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
