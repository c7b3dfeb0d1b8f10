"""Requests to the plugin pages as Airflow's UI makes them: a JWT the auth manager signs.

Import it only from tests/airflow (its conftest sets Airflow's environment first); Airflow is
imported when a token is made.
"""

from __future__ import annotations


def token(role: str | None) -> str:
    """A session token for a user of ``role`` (None: logged in, no role at all)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=f"test-{role}", role=role))


def as_ui(role: str | None = "viewer") -> dict[str, str]:
    """Headers of a request from the UI's iframe: the session cookie, no Authorization."""
    return {"Cookie": f"_token={token(role)}"}


def as_admin_api() -> dict[str, str]:
    """Headers of a REST API call by an admin: a bearer token."""
    return {"Authorization": f"Bearer {token('admin')}"}
