"""FastAPI dependencies for authentication.

The app factory puts a `kodkod.auth.KeyStore` on `app.state.keys`; these dependencies check a
request's headers against it and turn an `AuthError` into `401 {"detail": "<message>"}`.

Routes declare their level with `dependencies=[API]` / `[ADMIN]` (or a parameter
`perm: Permission = Depends(current_permission)` where the answer changes what they return).
`route_permission()` reads the level back from a route and `iter_route_permissions(app.routes)`
does it for every route, so one test can check the whole auth matrix. (FastAPI 0.165 includes
routers lazily: `app.routes` holds `_IncludedRouter` entries, not the APIRoutes themselves, and
dependencies given to `include_router()` live only on the effective route, so walk with
`iter_route_permissions`, not a plain loop over `app.routes`.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.routing import BaseRoute

from kodkod.auth import AuthError, KeyStore, Permission

__all__ = [
    "ADMIN",
    "API",
    "current_permission",
    "get_keys",
    "iter_route_permissions",
    "require_admin",
    "require_api",
    "route_permission",
]


def get_keys(request: Request) -> KeyStore:
    """The app's KeyStore (set on `app.state.keys` by the app factory)."""
    keys: KeyStore = request.app.state.keys
    return keys


def _unauthorized(exc: AuthError) -> HTTPException:
    return HTTPException(status_code=401, detail=exc.message)


async def require_api(request: Request) -> Permission:
    """Pass an API or admin key; returns ADMIN for the admin key, else API."""
    try:
        return get_keys(request).check_api(request.headers)
    except AuthError as exc:
        raise _unauthorized(exc) from None


async def require_admin(request: Request) -> Permission:
    """Pass only the admin key (`x-admin-key` or `Authorization: Bearer`)."""
    try:
        return get_keys(request).check_admin(request.headers)
    except AuthError as exc:
        raise _unauthorized(exc) from None


async def current_permission(request: Request) -> Permission:
    """Require an API key, then report ADMIN if the presented key is the admin key.

    The API check gates the request (401 on failure); the level is then decided by the
    permission lookup's header precedence (x-admin-key > x-api-key > authorization). If that
    lookup fails although the API check passed (say, a wrong x-admin-key next to a valid
    x-api-key) the request gets API.
    """
    keys = get_keys(request)
    try:
        keys.check_api(request.headers)
    except AuthError as exc:
        raise _unauthorized(exc) from None
    try:
        return keys.permission_of(request.headers)
    except AuthError:
        return Permission.API


API = Depends(require_api)
ADMIN = Depends(require_admin)


def _call_permission(dependant: Dependant) -> Permission:
    if dependant.call is require_admin:
        return Permission.ADMIN
    if dependant.call is require_api or dependant.call is current_permission:
        return Permission.API
    return Permission.NONE


def _dependant_permission(dependant: Dependant) -> Permission:
    found = _call_permission(dependant)
    for sub in dependant.dependencies:
        if found is Permission.ADMIN:
            break
        sub_found = _dependant_permission(sub)
        if sub_found is Permission.ADMIN or found is Permission.NONE:
            found = sub_found
    return found


def route_permission(route: APIRoute | RouteContext) -> Permission:
    """The strongest auth dependency anywhere in the route's dependency tree.

    ADMIN if `require_admin` appears, API if `require_api` (or `current_permission`) appears,
    NONE if the route is open. Takes an APIRoute or a RouteContext (an APIRoute as mounted
    through `include_router`, whose dependant also holds the inclusion's dependencies).
    """
    dependant: Dependant | None = getattr(route, "dependant", None)
    return Permission.NONE if dependant is None else _dependant_permission(dependant)


def iter_route_permissions(
    routes: Sequence[BaseRoute],
) -> Iterator[tuple[str, frozenset[str], Permission]]:
    """`(path, methods, permission)` for every FastAPI HTTP route, through included routers."""
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, APIRoute):
            yield context.path or "", frozenset(context.methods or ()), route_permission(context)
