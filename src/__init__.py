"""prunesweep: experiment-tracked sweeps of weight pruning and quantization.

tensorflow-model-optimization only accepts Keras 2 models, so TensorFlow must see
``TF_USE_LEGACY_KERAS=1`` before it is first imported.  Setting it here, in the
package's first import, guarantees that for every module and entry point;
``src.keras_env`` then hands out ``tf``, ``keras`` (tf_keras) and ``tfmot``.
The libraries' start-up chatter is silenced here too, before they are imported
(``src.quiet``; ``PRUNESWEEP_VERBOSE=1`` brings it back).

TensorFlow's oneDNN kernels are off unless the environment says otherwise
(``TF_ENABLE_ONEDNN_OPTS=1``): with them, fine-tuning a channel-pruned ResNet-8 (8, 17 and 29
channels) corrupted the heap in oneDNN's convolution filter gradient and aborted the process
(``free(): invalid pointer``, in ``MklConvCustomBackpropFilterOp``); without them the same run
finishes. benchmarks/RESULTS.md has what it costs in speed.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from src import quiet  # noqa: E402  (after the variable above, before any library)

quiet.silence()
