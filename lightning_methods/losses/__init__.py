"""Loss functions of lightning-methods: pure functions of logits and targets."""

__all__: list[str] = []
