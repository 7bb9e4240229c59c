"""depthq producer: watches a folder and enqueues finished photos. Never imports numpy, torch or coremltools."""
