"""The one module that decides which Keras the project uses (Keras 2 through tf_keras).

Every other module imports ``tf``, ``keras`` and ``tfmot`` from here.  The package's
``__init__`` has already set ``TF_USE_LEGACY_KERAS=1``.
"""

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

__all__ = ["keras", "tf", "tfmot"]
