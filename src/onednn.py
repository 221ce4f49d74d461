"""TensorFlow's oneDNN kernels, and the runs that start without them.

oneDNN makes ResNet-8 training 2.4x faster here (benchmarks/RESULTS.md), so it stays on. But
fine-tuning a channel-pruned ResNet-8 with it has corrupted the heap in oneDNN's convolution
filter gradient and aborted the process (``free(): invalid pointer`` in
``MklConvCustomBackpropFilterOp``; e.g. 8, 17 and 29 channels left, every time), while the
same run without oneDNN finishes. TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, at import,
so a process that fine-tunes channel-pruned models must start with it set: search trials do
(each is a process of its own); a single run says how.
"""

from __future__ import annotations

import os

ENV = "TF_ENABLE_ONEDNN_OPTS"


def unsafe(prune_method: str, finetune_epochs: int) -> bool:
    """Returns whether these settings fine-tune a channel-pruned model, which oneDNN crashed on."""
    return prune_method == "channel" and finetune_epochs > 0


def child_env(prune_method: str, finetune_epochs: int) -> dict[str, str]:
    """Returns the environment entries a process running these settings should start with:
    oneDNN off when they are unsafe, unless the user chose a value."""
    if unsafe(prune_method, finetune_epochs) and ENV not in os.environ:
        return {ENV: "0"}
    return {}


def warning(prune_method: str, finetune_epochs: int) -> str | None:
    """Returns the one-line warning for a run of unsafe settings in a process with oneDNN on."""
    if not unsafe(prune_method, finetune_epochs) or os.environ.get(ENV) == "0":
        return None
    return ("warning: fine-tuning a channel-pruned model with TensorFlow's oneDNN kernels has "
            "crashed natively on some channel counts; if this run aborts, run the same command "
            f"with {ENV}=0 (training 2.4x slower): the fine-tuning resumes after its last saved "
            "epoch")
