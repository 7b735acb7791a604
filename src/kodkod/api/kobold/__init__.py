"""The KoboldAI API: `router.mount(app)` serves /api/v1, /api/latest, /api/extra.

Modules: `schemas` (request bodies, Kobold field meanings), `convert` (→ engine request through
the shared conversion), `jobs` (the genkey job table for abort/check), `router` (the routes).
"""
