"""kodkod.backends.llamacpp."""
