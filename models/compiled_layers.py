"""The language model's decoder layers under torch.compile, in the trainer's update only.

In eager mode every RMSNorm, SwiGLU, rotary embedding and residual add of a decoder layer is its
own memory-bound kernel (and again in the backward, and again in a checkpointed recompute);
inductor fuses them. The trainer opens the block around its update phase (scoring forwards,
their backwards, old log-probs): sampling keeps the eager layers (a static-cache ``generate``
compiles the whole decoding step itself, and the two must not nest). The block must hold the
backward too: under gradient checkpointing the backward recomputes each layer's forward, and a
recompute that runs eager code against the tensors a compiled forward saved fails (transformers
<= 5.17 checkpoints the layer's whole call, outside the compiled code; later versions checkpoint
``forward``, inside it, where dynamo traces the checkpoint itself).
The switch is ``Module._compiled_call_impl``, the attribute ``nn.Module.compile()`` sets, set
for the block and cleared after it. Compiled graphs live in dynamo's cache of the layers' shared
code, guarded on the layer class, not on one layer (``inline_inbuilt_nn_modules``): all layers
and all later steps reuse them, and nothing compiled is kept on the model (a deep copy of the
model must not call the original's layers).
Off by default (``defender.*.compile_update``; inductor takes ~25 s a graph on a CPU), on in the
``full`` preset: on an H100 the 3B update went 0.95 -> 0.80 s at batch 16 and 3.50 -> 2.97 s at
batch 64 (experiments/RESULTS.md, variant ``compiled`` of ``experiments/defender_dapo.py``).
"""

from __future__ import annotations

import contextlib

import torch

BACKEND = "inductor"  # tests set "aot_eager": the same graphs and autograd, without inductor's minutes of CPU codegen


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers (``...language_model.layers``, under a peft wrapper too)."""
    for m in model.modules():
        layers = getattr(getattr(m, "language_model", None), "layers", None)
        if layers is not None:
            return list(layers)
    raise TypeError(f"{type(model).__name__}: no language_model.layers to compile (a Qwen2.5-VL model is expected)")


@contextlib.contextmanager
def compiled_layers(model, enabled: bool = True, backend: str | None = None):
    """Within the block, each decoder layer of ``model`` runs compiled; outside it, eagerly."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        # dynamic: batch and sequence lengths change with every micro-batch; one graph per grad mode
        # and attention-mask kind (none without padding) instead of a static graph per shape first
        layer._compiled_call_impl = torch.compile(layer._call_impl, backend=backend or BACKEND, dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
