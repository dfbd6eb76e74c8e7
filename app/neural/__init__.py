"""Neural networks and clusters: JAX models, data sets, training and the
database records of jobs, models, clusters and nodes."""
