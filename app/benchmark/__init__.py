"""The extended-duration benchmark: phases, sampler, load and report."""
