"""prunesweep: experiment-tracked sweeps of weight pruning and quantization.

tensorflow-model-optimization only accepts Keras 2 models, so TensorFlow must see
``TF_USE_LEGACY_KERAS=1`` before it is first imported.  Setting it here, in the
package's first import, guarantees that for every module and entry point;
``src.keras_env`` then hands out ``tf``, ``keras`` (tf_keras) and ``tfmot``.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
