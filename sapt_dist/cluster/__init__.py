"""Planning for clusters: memory plans and scaling-study sweeps."""
