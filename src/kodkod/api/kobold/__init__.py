"""kodkod.api.kobold."""
