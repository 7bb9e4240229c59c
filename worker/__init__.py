"""depthq worker: a long-lived process that keeps one DepthPro backend loaded and turns jobs into depth files."""
