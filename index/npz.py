"""Byte-deterministic ``.npz`` packing, loadable with ``np.load(..., allow_pickle=False)``.

``np.savez`` stamps each zip member with the current time, so the same arrays give different
bytes on every call. Fixed member timestamps make a replayed build byte-identical, which is
how "replaying changes nothing" can be checked with a plain hash.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(member, "w", force_zip64=True) as fh:
                # allow_pickle=False turns an accidental object array into an error here,
                # not into a file that only a pickle-enabled reader can open.
                # np.asarray, not ascontiguousarray: the latter turns 0-d arrays into 1-d.
                np.lib.format.write_array(fh, np.asarray(arrays[name]), allow_pickle=False)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
