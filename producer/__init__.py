"""depthq's producer, folder -> queue: the watcher, readiness (settle), enqueueing and the collector.

Everything that runs on the host that owns the folder, and nothing else. It imports `depthq` (config,
contract, files, connection) and never `worker`, numpy, torch or coremltools.
"""
