"""Model resolution: request ``model`` → configured provider (alias, name, id, wildcard)."""

from __future__ import annotations

from plano_extproc.config import Config, Provider
from plano_extproc.errors import bad_request
from plano_extproc.identifiers import check_model_id
from plano_extproc.providers import bare_model_provider, canonical_provider


class Catalog:
    def __init__(self, config: Config) -> None:
        self.providers = config.providers
        self.aliases = dict(config.aliases)
        self.default = config.default_provider
        self._exact: dict[str, Provider] = {}
        for p in self.providers:
            if p.wildcard:
                continue
            canonical = f"{canonical_provider(p.model.split('/', 1)[0])}/{p.model_id}"
            for key in (p.model_id, p.model, p.name, canonical):
                self._exact.setdefault(key, p)
        # Keyed by the canonical prefix as written (google/* answers gemini/x too), never by
        # provider_interface: a custom vllm/* speaking openai must not capture openai/<x>.
        self._wildcards: dict[str, Provider] = {}
        for p in self.providers:
            if p.wildcard:
                self._wildcards.setdefault(canonical_provider(p.model.split("/", 1)[0]), p)

    def lookup(self, name: str) -> Provider | None:
        """Alias → exact name/model/id → canonical prefix → wildcard by prefix."""
        name = self.aliases.get(name, name)
        hit = self._exact.get(name)
        if hit is not None:
            return hit
        if "/" in name:
            prefix, model_id = name.split("/", 1)
            canonical = f"{canonical_provider(prefix)}/{model_id}"
            hit = self._exact.get(canonical)
            if hit is not None:
                return hit
            wild = self._wildcards.get(canonical_provider(prefix))
            if wild is not None and model_id and model_id != "*":
                return wild.with_model_id(check_model_id(model_id, name))
            return None
        # A bare name ("gpt-4.1") through its family's wildcard (openai/*), as Plano resolves it.
        family = bare_model_provider(name)
        wild = self._wildcards.get(family) if family is not None else None
        if wild is not None:
            return wild.with_model_id(check_model_id(name, name))
        return None

    def resolve(self, requested: object) -> Provider:
        """The provider for a request's ``model``; a missing model uses ``default: true``."""
        if requested is None:
            if self.default is None:
                raise bad_request(
                    "'model' is required (no default provider is configured). "
                    f"Configured models: {', '.join(self.names())}"
                )
            return self.default
        if not isinstance(requested, str) or not requested:
            raise bad_request("'model' must be a non-empty string")
        hit = self.lookup(requested)
        if hit is None:
            raise bad_request(
                f"Model '{requested}' not found in configured providers. "
                f"Configured models: {', '.join(self.names())}"
            )
        return hit

    def names(self) -> list[str]:
        return [p.name for p in self.providers] + list(self.aliases)
