"""The compiler layer: the pass ``registry`` and its built-in passes, the textual ``pipeline``, the
standard ``pipelines`` (built here only), ``instrument``ation hooks and ``plugins``. Importing the
package registers the built-in passes."""

from __future__ import annotations

from qinject.compiler import builtin_passes  # noqa: F401  (registers the built-in passes)
