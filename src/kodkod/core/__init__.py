"""kodkod.core: value types shared by every layer (sampling parameters, events, constraints,
backend-facing records) and the pure numpy sampling stages. Imports nothing else of kodkod."""
