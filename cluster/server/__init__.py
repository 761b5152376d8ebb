"""The HTTP server: the OpenAI-compatible Serve application, its deployments and the `ray.get` gateway."""
