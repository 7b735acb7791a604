"""kodkod.api.openai."""
