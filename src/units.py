"""Units and sizes, defined once: MB = 10^6 bytes, KB = 10^3 bytes, and the zipped size."""

from __future__ import annotations

import io
import zipfile

KB = 1_000
MB = 1_000_000


def zipped_size(payload: bytes, name: str) -> int:
    """Returns the size of a deflate zip holding payload as one file, as the reference measured."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, payload)
    return len(buffer.getvalue())


def kb(size: float) -> str:
    """Returns a byte count as KB with one decimal, e.g. '59.0 KB'."""
    return f"{size / KB:.1f} KB"
