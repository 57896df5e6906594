"""Using a trained model: loading it from a run, a checkpoint or a Hugging Face folder
into one process, generating, evaluating, and exporting it to Hugging Face.

    from raytron.platform.models import load_model
    model = load_model("runs/tiny")
    print(model.generate(["The ", "A list"], max_new_tokens=30, greedy=True)[0].text)
"""

from __future__ import annotations

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str):
    """`loading` (torch) is imported when a model is loaded, not when a command of this
    package is only named (`raytron --help` lists them)."""
    if name in __all__:
        from raytron.platform.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
