"""Per-request route preferences sent inline in the body (both forms from Plano's docs).

``routing_preferences: [{name, description, models, selection_policy?}]`` and the older
``routing_policy: [{model, routing_preferences: [{name, description}]}]``. Inline routes
replace the config's routes for that request only; their models must be declared providers.

Every part is client-controlled, so it is bounded here, at the edge: route names end up in the
``x-plano-route`` response header (printable, no control characters, bounded length), and the
route set is work for the router (the embedded router embeds every phrase of every
description), so its size is capped with a clear 400 instead of a CPU bill.
"""

from __future__ import annotations

from typing import Any

from plano_extproc.catalog import Catalog
from plano_extproc.errors import bad_request
from plano_extproc.routing.base import RoutePreference

INLINE_KEYS = ("routing_preferences", "routing_policy")

#: Longest inline route name (characters); names are reported in a response header.
MAX_ROUTE_NAME = 128
#: Most distinct routes in one inline set (Plano's examples use a handful).
MAX_INLINE_ROUTES = 32
#: Longest route description (characters).
MAX_DESCRIPTION = 1024
#: Characters of all names and descriptions of one inline set together (the embedded router
#: embeds each description phrase twice: 8 KiB of short phrases is ~1,000 texts, ~2 s on 2 cores).
MAX_INLINE_CHARS = 8192
#: Most entries in the other inline arrays (``routing_policy``, a route's ``models``).
MAX_INLINE_ITEMS = 64


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where} must be a non-empty string")
    return value


def _list(value: Any, where: str, limit: int = MAX_INLINE_ITEMS) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"{where} must be an array")
    if len(value) > limit:
        raise bad_request(f"{where} has {len(value)} entries; at most {limit}")
    return value


def _route_name(value: Any, where: str) -> str:
    """A route name fit for the ``x-plano-route`` header: 1..MAX_ROUTE_NAME printable
    characters (any language: no control, format or separator characters other than the
    space), no leading/trailing spaces. A CR/LF would split the response; non-ASCII letters
    are sent percent-encoded (``identifiers.ascii_header``)."""
    name = _str(value, where)
    if len(name) > MAX_ROUTE_NAME:
        raise bad_request(f"{where} is too long ({len(name)} characters; at most {MAX_ROUTE_NAME})")
    if not name.isprintable() or name != name.strip(" "):
        raise bad_request(
            f"{where} must be printable text (no control or invisible formatting characters, "
            "no leading or trailing spaces)"
        )
    return name


def _description(value: Any, where: str) -> str:
    desc = _str(value, where)
    if len(desc) > MAX_DESCRIPTION:
        raise bad_request(
            f"{where} is too long ({len(desc)} characters; at most {MAX_DESCRIPTION})"
        )
    return desc


def parse_inline(body: dict[str, Any], catalog: Catalog) -> tuple[RoutePreference, ...] | None:
    """The request's inline routes, or ``None`` when it sends none (config routes apply)."""
    if "routing_preferences" not in body and "routing_policy" not in body:
        return None
    routes: dict[str, tuple[str, list[str], str]] = {}
    undeclared: list[str] = []

    def model_name(m: Any, where: str) -> str:
        name = _str(m, where)
        prov = catalog.lookup(name)
        if prov is None:
            undeclared.append(name)
            return name
        return prov.name

    if "routing_preferences" in body:
        for i, item in enumerate(
            _list(body["routing_preferences"], "routing_preferences", MAX_INLINE_ROUTES)
        ):
            at = f"routing_preferences[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{at} must be an object with name, description and models")
            name = _route_name(item.get("name"), f"{at}.name")
            desc = _description(item.get("description"), f"{at}.description")
            models = _list(item.get("models"), f"{at}.models")
            if not models:
                raise bad_request(f"{at}.models must list at least one model")
            policy = item.get("selection_policy")
            prefer = "none"
            if policy is not None:
                if not isinstance(policy, dict):
                    raise bad_request(f"{at}.selection_policy must be an object")
                prefer = policy.get("prefer") or "none"
                if prefer not in ("cheapest", "fastest", "none"):
                    raise bad_request(
                        f"{at}.selection_policy.prefer must be cheapest, fastest or none"
                    )
            if name in routes:
                raise bad_request(f"{at}.name: duplicate route name {name!r}")
            names = [model_name(m, f"{at}.models[{j}]") for j, m in enumerate(models)]
            routes[name] = (desc, names, prefer)

    if "routing_policy" in body:
        for i, item in enumerate(_list(body["routing_policy"], "routing_policy")):
            at = f"routing_policy[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{at} must be an object with model and routing_preferences")
            model = model_name(item.get("model"), f"{at}.model")
            prefs = _list(
                item.get("routing_preferences"), f"{at}.routing_preferences", MAX_INLINE_ROUTES
            )
            for j, pref in enumerate(prefs):
                pat = f"{at}.routing_preferences[{j}]"
                if not isinstance(pref, dict):
                    raise bad_request(f"{pat} must be an object with name and description")
                name = _route_name(pref.get("name"), f"{pat}.name")
                desc = _description(pref.get("description"), f"{pat}.description")
                if name in routes:
                    if model not in routes[name][1]:
                        routes[name][1].append(model)
                else:
                    routes[name] = (desc, [model], "none")

    if len(routes) > MAX_INLINE_ROUTES:
        raise bad_request(
            f"inline routing preferences define {len(routes)} routes; at most {MAX_INLINE_ROUTES}"
        )
    chars = sum(len(n) + len(d) for n, (d, _, _) in routes.items())
    if chars > MAX_INLINE_CHARS:
        raise bad_request(
            f"inline routing preferences are too large ({chars} characters of names and "
            f"descriptions; at most {MAX_INLINE_CHARS})"
        )
    if undeclared:
        raise bad_request(
            "inline routing preferences reference models not declared in model_providers: "
            + ", ".join(dict.fromkeys(undeclared))
        )
    return tuple(
        RoutePreference(name=n, description=d, models=tuple(ms), prefer=p)
        for n, (d, ms, p) in routes.items()
    )
