"""Using a trained model: loading it from a run, a checkpoint or a Hugging Face folder
into one process, generating, evaluating, and exporting it to Hugging Face.

    from raytron.platform.models import load_model
    model = load_model("runs/tiny")
    print(model.generate(["The ", "A list"], max_new_tokens=30, greedy=True)[0].text)
"""

from raytron.platform.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
