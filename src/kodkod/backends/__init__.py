"""kodkod.backends."""
