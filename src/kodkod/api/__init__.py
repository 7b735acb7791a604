"""kodkod.api."""
