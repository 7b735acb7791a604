"""kodkod.engine."""
