"""The client of the hosted FLUX.2 APIs (Black Forest Labs, Oxen.ai): transport, jobs, providers."""
