"""kodkod.models."""
