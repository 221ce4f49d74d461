"""Library start-up chatter, silenced in one place; ``PRUNESWEEP_VERBOSE=1`` brings it back.

TensorFlow, LiteRT, absl and the TFLite converter print from C++ straight to file
descriptor 2, where no Python setting reaches (the absl banner, oneDNN and CUDA lines, the
XNNPACK delegate line, ``fully_quantize: ...``).  So in entry points stderr goes through a
small filter process that drops those lines and passes everything else on (tracebacks,
errors, warnings not listed here).  Being its own process, it still forwards what a dying
main process wrote last.  Python-side noise is handled with ``warnings`` filters and
logger levels.  Keras progress goes to stdout and is untouched.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import warnings

VERBOSE_ENV = "PRUNESWEEP_VERBOSE"

# Lines written by native code to fd 2, matched at the line's start.
NATIVE_NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] ",  # absl/glog info and warning lines
    r"E\d{4} [\d:.]+ +\d+ cuda\w*\.cc:\d+\] ",  # no GPU here: cuInit's error is expected
    r"INFO: Created TensorFlow Lite XNNPACK delegate",
    r"fully_quantize: \d",
)

# Python warnings whose advice does not apply here (the messages are regular expressions).
PYTHON_NOISE = (
    r"You are saving your model as an HDF5 file",  # the .h5 export is deliberate
    r"Statistics for quantized inputs were expected",  # float inputs, calibrated
    r"Compiled the loaded model, but the compiled metrics",
    r".*is experimental \(supported from",  # Optuna's heartbeat and retry API
    r"Argument ``\w+`` is an experimental feature",
)

# The filter process: reads stderr's pipe, writes all but the noise to the real stderr.
_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)   # outlive Ctrl-C, to forward the last words
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when every writer has closed the pipe
noise = re.compile(("|".join(sys.argv[1:])).encode())
pending = b""
while chunk := os.read(0, 65536):
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    kept = [line + b"\n" for line in lines if not noise.match(line)]
    if b"\r" in pending:  # a progress bar redrawing one line: pass it on now
        kept.append(pending)
        pending = b""
    if kept:
        os.write(1, b"".join(kept))
if pending and not noise.match(pending):
    os.write(1, pending)
"""


def verbose() -> bool:
    """Returns whether the user asked for the libraries' own output (PRUNESWEEP_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def silence() -> None:
    """Silences the libraries' chatter for this process, unless PRUNESWEEP_VERBOSE=1.

    Called first thing from ``src/__init__``, before TensorFlow or MLflow are imported.
    """
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial tables"
    for message in PYTHON_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # TensorFlow's logger propagates to the root logger that Hydra configures, so its INFO
    # lines ("Assets written to ...") appeared twice; its warnings here are the ones above.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if "pytest" not in sys.modules:  # pytest owns fd 2 to capture it
        _filter_native_stderr()


_filter: subprocess.Popen | None = None


def _filter_native_stderr() -> None:
    """Routes fd 2 through the filter process, once per process."""
    global _filter
    if _filter is not None:
        return
    try:
        read_end, write_end = os.pipe()
        _filter = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, *NATIVE_NOISE],
                                   stdin=read_end, stdout=2, close_fds=True)
    except OSError:
        return  # no filter: the output is noisier, nothing else changes
    real_stderr = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(read_end)
    atexit.register(_drain, real_stderr)
    # stderr now reaches the terminal at the filter's pace. An unbuffered print() writes its
    # text and its newline in two writes, and when stdout and stderr share a pipe a stderr line
    # could land between them (seen in CI: Optuna's "[W ...] Trial 0 failed" glued to the end
    # of a trial line). Line buffering writes each stdout line whole.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True, write_through=False)


def _drain(real_stderr: int) -> None:
    """Restores the real stderr and lets the filter print what it still holds."""
    if sys.stderr is not None:
        sys.stderr.flush()
    os.dup2(real_stderr, 2)
    try:
        _filter.wait(timeout=5)  # ends at end of input, unless a child still holds the pipe
    except subprocess.TimeoutExpired:
        pass
