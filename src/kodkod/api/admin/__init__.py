"""kodkod.api.admin."""
