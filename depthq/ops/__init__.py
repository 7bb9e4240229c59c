"""What an operator looks at: `depthq status`, `depthq failed`, and the dashboard with its results gallery.

They read Redis and the output folder only, so they run on any host with the config, without numpy.
"""
