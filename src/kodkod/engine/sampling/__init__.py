"""kodkod.engine.sampling."""
