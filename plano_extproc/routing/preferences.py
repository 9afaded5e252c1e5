"""Per-request route preferences sent inline in the body (both forms from Plano's docs).

``routing_preferences: [{name, description, models, selection_policy?}]`` and the older
``routing_policy: [{model, routing_preferences: [{name, description}]}]``. Inline routes
replace the config's routes for that request only; their models must be declared providers.
"""

from __future__ import annotations

from typing import Any

from plano_extproc.catalog import Catalog
from plano_extproc.errors import bad_request
from plano_extproc.routing.base import RoutePreference

INLINE_KEYS = ("routing_preferences", "routing_policy")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{where} must be a non-empty string")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise bad_request(f"{where} must be an array")
    return value


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
        for i, item in enumerate(_list(body["routing_preferences"], "routing_preferences")):
            at = f"routing_preferences[{i}]"
            if not isinstance(item, dict):
                raise bad_request(f"{at} must be an object with name, description and models")
            name = _str(item.get("name"), f"{at}.name")
            desc = _str(item.get("description"), f"{at}.description")
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
            prefs = _list(item.get("routing_preferences"), f"{at}.routing_preferences")
            for j, pref in enumerate(prefs):
                pat = f"{at}.routing_preferences[{j}]"
                if not isinstance(pref, dict):
                    raise bad_request(f"{pat} must be an object with name and description")
                name = _str(pref.get("name"), f"{pat}.name")
                desc = _str(pref.get("description"), f"{pat}.description")
                if name in routes:
                    if model not in routes[name][1]:
                        routes[name][1].append(model)
                else:
                    routes[name] = (desc, [model], "none")

    if undeclared:
        raise bad_request(
            "inline routing preferences reference models not declared in model_providers: "
            + ", ".join(dict.fromkeys(undeclared))
        )
    return tuple(
        RoutePreference(name=n, description=d, models=tuple(ms), prefer=p)
        for n, (d, ms, p) in routes.items()
    )
