"""kodkod.api.core."""
