"""What can go wrong with a store, each said in one line."""


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
