"""prunesweep: experiment-tracked sweeps of weight pruning and quantization.

tensorflow-model-optimization only accepts Keras 2 models, so TensorFlow must see
``TF_USE_LEGACY_KERAS=1`` before it is first imported.  Setting it here, in the
package's first import, guarantees that for every module and entry point;
``src.keras_env`` then hands out ``tf``, ``keras`` (tf_keras) and ``tfmot``.
The libraries' start-up chatter is silenced here too, before they are imported
(``src.quiet``; ``PRUNESWEEP_VERBOSE=1`` brings it back).
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from src import quiet  # noqa: E402  (after the variable above, before any library)

quiet.silence()
