"""Callbacks of lightning-methods (installed as ``lightning_methods.callbacks``)."""

__all__: list[str] = []
