"""The models a server answers to: its base by its name, and each adapter as `BASE:NAME`
(Ray Serve LLM's convention, which /v1/models lists) or as `NAME`. Any other name is a
404 in OpenAI's shape (`code: model_not_found`), as OpenAI answers an unknown model."""

from __future__ import annotations

from raytron.platform.serving.adapters import AdapterLibrary
from raytron.platform.serving.requests import BadRequest, shown


class ServedModels:
    def __init__(self, base: str, library: AdapterLibrary | None):
        self.base, self.library = base, library

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names; None for the base. BadRequest (404)
        for a model this server does not have."""
        if model == self.base:
            return None
        name = model.removeprefix(f"{self.base}:")
        if self.library is not None and self.library.path(name) is not None:
            return name
        adapters = f" and its adapters as '{self.base}:NAME'" if self.library else ""
        raise BadRequest(f"the model '{shown(model)}' does not exist here: this server serves "
                         f"'{self.base}'{adapters} (GET /v1/models lists them)", "model",
                         status=404, code="model_not_found")

    def listed(self, created: int) -> list[dict]:
        """/v1/models' entries: the base, then each adapter with the base as its parent."""
        entry = {"object": "model", "created": created, "owned_by": "raytron"}
        adapters = self.library.names() if self.library is not None else []
        return [{"id": self.base, **entry, "parent": None},
                *({"id": f"{self.base}:{name}", **entry, "parent": self.base}
                  for name in adapters)]
