"""One generation: the request and its checks, reference images, the schedule and sampling loop, decode."""
