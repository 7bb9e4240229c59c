"""depthq's worker, queue -> depth: a long-lived process that keeps one DepthPro backend loaded.

The rq worker, the job, transports, image loading, preprocessing, the backends, the depth math, the
preview, the output store, and model loading, catalog and conversion. It imports `depthq` and never
`producer`.
"""
