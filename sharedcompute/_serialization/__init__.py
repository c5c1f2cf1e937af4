"""Private serialization layer: Python values <-> (small header, aligned region).

Layering: ``_format`` (kinds, alignment, :class:`Serialized`) is imported by every codec
(``_pickled``, ``_ndarray``, ``_arrow``, ``_raw``); ``_codec`` chooses among them and is the
design reference (read its docstring first); ``_locate`` explains pickling failures;
``_source`` sends the source lines of code pickled by value along (for remote tracebacks).
Only the names below are used by the rest of sharedcompute. Importing this package does not
import numpy, pyarrow or pandas.
"""

from __future__ import annotations

from ._codec import deserialize, serialize
from ._format import ALIGNMENT, Kind, Serialized
from ._source import dumps_function

__all__ = ["ALIGNMENT", "Kind", "Serialized", "deserialize", "dumps_function", "serialize"]
