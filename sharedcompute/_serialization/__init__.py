"""Private serialization layer: Python values <-> (small header, aligned region).

Layering: ``_format`` (kinds, alignment, :class:`Serialized`) is imported by every codec
(``_pickled``, ``_ndarray``, ``_arrow``, ``_raw``); ``_codec`` chooses among them and is the
design reference (read its docstring first); ``_locate`` explains pickling failures. Only the
names below are used by the rest of sharedcompute. Importing this package does not import
numpy, pyarrow or pandas.
"""

from __future__ import annotations

from ._codec import deserialize, serialize
from ._format import ALIGNMENT, Kind, Serialized

__all__ = ["ALIGNMENT", "Kind", "Serialized", "deserialize", "serialize"]
