"""edgeprune: make LLMs small and fast enough for edge devices, and prove it on the device.

Importing this package is cheap: torch and transformers are imported only by the modules that need them.
"""

__version__ = "0.1.0"

from edgeprune.errors import EdgePruneError

__all__ = ["EdgePruneError", "__version__"]
