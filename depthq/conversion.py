"""`depthq models convert`'s choices: compression, precision and I/O contract of a Core ML conversion.

They are here, in the core, rather than in `worker.convert` that acts on them, because the CLI's
parser offers them as choices for every command it parses, and the watcher's commands must not import
the worker's modules. The converter takes its types from here, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal, get_args

Compression = Literal["none", "int8", "palettize8", "palettize6", "palettize4"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)
Precision = Literal["float16", "float32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Contract = Literal["canonical", "meters"]
CONTRACTS: tuple[str, ...] = get_args(Contract)
