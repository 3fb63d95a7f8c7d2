"""Optimizers of lightning-methods: ordinary ``torch.optim.Optimizer`` subclasses usable without Lightning.

Conventions (see ARCHITECTURE.md): ``step(closure)`` evaluates the closure itself (under ``torch.enable_grad()``);
complete ``state_dict``/``load_state_dict``; tensors only in ``state``; fp32 math; class attribute
``supports_grad_scaler = False`` where a GradScaler (``16-mixed``) cannot serve the step.
"""

__all__: list[str] = []
