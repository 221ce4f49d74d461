"""What a device sees of an exported model: LiteRT latency at batch 1, and its MACs.

Latency is the wall time of ``interpreter.invoke()`` on one random input, measured with
``time.perf_counter`` after warm-up invokes. Shared CPUs are noisy, so timing is split into
rounds (repeats): the reported median is the median of the rounds' medians (one slow round
cannot move it) and p90 is taken over every timed invoke (the spread). ``compare_latency``
interleaves several models invoke by invoke, so noise hits all of them alike and their ratio
is fair even when the absolute figures drift.

``kernels`` picks LiteRT's kernels: ``xnnpack`` (LiteRT's default, XNNPACK delegate) or
``builtin`` (its own kernels, no delegate: what runtimes without XNNPACK run). They differ by
processor: on x86 with AMX, XNNPACK's int8 convolutions compute tiles of 16 pixels by 64
output channels, so a layer of 8 channels costs what one of 64 does (README: Real size and
real speed).
"""

from __future__ import annotations

import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from src.config import LATENCY_KERNELS
from src.keras_env import keras

DEFAULT_WARMUP, DEFAULT_RUNS, DEFAULT_REPEATS = 10, 30, 5
KERNELS = LATENCY_KERNELS
RESOLVERS = dict(zip(KERNELS, (OpResolverType.AUTO,  # LiteRT's default: XNNPACK
                               OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)))
KERNEL_LABELS = {"xnnpack": "XNNPACK", "builtin": "built-in"}
INT8_EXTENSIONS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm", "sme")


@dataclass
class LatencyStats:
    """Latency of one model in milliseconds: median of round medians, p90 over all invokes."""

    median_ms: float
    p90_ms: float
    runs: int  # timed invokes in all


def processor() -> str:
    """Returns the CPU's name and its int8 dot-product extensions (AMX, VNNI; Arm's dot product,
    i8mm, SME) from /proc/cpuinfo: they choose LiteRT's int8 kernels, so a latency is only
    comparable on the same kind."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name = re.search(r"^(?:model name|Hardware)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    found = set(flags[1].split()) if flags else set()
    extensions = [e for e in INT8_EXTENSIONS if e in found]
    label = name[1].strip() if name else platform.machine() or "unknown processor"
    return f"{label} ({', '.join(extensions) or 'no int8 dot-product extension'})"


def _interpreter(flatbuffer: bytes, threads: int, kernels: str, seed: int = 0):
    """Returns a ready interpreter with a random batch-1 input of the input tensor's dtype."""
    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads,
                              experimental_op_resolver_type=RESOLVERS[kernels])
    detail = interpreter.get_input_details()[0]
    shape = [1, *detail["shape"][1:]]
    interpreter.resize_tensor_input(detail["index"], shape)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed)
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        sample = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        sample = (rng.random(shape) * 255).astype(dtype)  # the models take raw pixels
    interpreter.set_tensor(detail["index"], sample)
    return interpreter


def _timed(interpreter) -> float:
    start = time.perf_counter()
    interpreter.invoke()
    return (time.perf_counter() - start) * 1000


def _stats(rounds: list[list[float]]) -> LatencyStats:
    every = [t for r in rounds for t in r]
    return LatencyStats(float(np.median([np.median(r) for r in rounds])),
                        float(np.percentile(every, 90)), len(every))


def compare_latency(flatbuffers: dict[str, bytes], threads: int = 1,
                    warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS,
                    repeats: int = DEFAULT_REPEATS, kernels: str = "xnnpack",
                    ) -> dict[str, LatencyStats]:
    """Returns each model's latency, its invokes interleaved with the others' run by run.

    Each of the repeats rounds times runs invokes of every model, alternating between the
    models (in a rotated order per invoke, so no model always follows the same one).
    """
    names = list(flatbuffers)
    interpreters = {name: _interpreter(flatbuffers[name], threads, kernels) for name in names}
    for _ in range(warmup):
        for name in names:
            interpreters[name].invoke()
    rounds: dict[str, list[list[float]]] = {name: [] for name in names}
    for _ in range(repeats):
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(runs):
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                times[name].append(_timed(interpreters[name]))
        for name in names:
            rounds[name].append(times[name])
    return {name: _stats(rounds[name]) for name in names}


def tflite_latency(flatbuffer: bytes, threads: int = 1, warmup: int = DEFAULT_WARMUP,
                   runs: int = DEFAULT_RUNS, repeats: int = DEFAULT_REPEATS,
                   kernels: str = "xnnpack") -> LatencyStats:
    """Returns the model's batch-1 LiteRT latency (median of round medians, p90, invokes)."""
    return compare_latency({"model": flatbuffer}, threads, warmup, runs, repeats,
                           kernels)["model"]


def _opcode_names() -> dict[int, str]:
    return {value: name for name, value in vars(schema.BuiltinOperator).items()
            if not name.startswith("_")}


def tflite_macs(flatbuffer: bytes) -> int:
    """Returns the multiply-accumulates of one inference (batch 1), from the TFLite graph.

    Counts CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV and BATCH_MATMUL from
    their tensor shapes; element-wise ops, pooling and means are not multiply-accumulates.
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    names = _opcode_names()
    total = 0
    for subgraph in model.subgraphs[:1]:  # the main graph; others are control-flow bodies
        shapes = [list(t.shape) if t.shape is not None else [] for t in subgraph.tensors]
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
            total += _op_macs(kind, [shapes[i] for i in op.inputs if i >= 0],
                              [shapes[i] for i in op.outputs])
    return int(total)


def _op_macs(kind: str, ins: list[list[int]], outs: list[list[int]]) -> int:
    """Returns one operator's MACs at batch 1 from its input and output shapes."""
    if not outs or not outs[0]:
        return 0
    out = outs[0]
    per_item = math.prod(out[1:])  # one output element per batch item
    if kind == "CONV_2D":  # filter [out, kh, kw, in / groups]
        return per_item * math.prod(ins[1][1:])
    if kind == "DEPTHWISE_CONV_2D":  # filter [1, kh, kw, channels]
        return per_item * ins[1][1] * ins[1][2]
    if kind == "FULLY_CONNECTED":  # weights [units, in]
        return per_item * ins[1][1]
    if kind == "TRANSPOSE_CONV":  # filter [out, kh, kw, in]; every input pixel spreads a filter
        return math.prod(ins[2][1:3]) * math.prod(ins[1])
    if kind == "BATCH_MATMUL":
        return per_item * ins[0][-1]
    return 0


def params(model: keras.Model) -> int:
    """Returns the Keras model's parameter count (trainable and not, e.g. BatchNorm stats)."""
    return int(model.count_params())
