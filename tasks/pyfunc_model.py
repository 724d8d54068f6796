"""The MLflow pyfunc model of a Quillan export, logged as *code* (MLflow "models from code"), so
that loading it never unpickles anything: text prompts in, completions out.

`mlflow.pyfunc.load_model("models:/quillan@champion").predict(["12+30="])` → ["42"].
The export directory travels as the artifact `export`; `quillan.export.load` rebuilds the model.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class QuillanPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from quillan.export import load

        self.model, self.tokenizer = load(context.artifacts["export"])
        if self.tokenizer is None:
            raise FileNotFoundError(f"{context.artifacts['export']}: the export has no tokenizer.json")

    def predict(self, context, model_input, params=None):  # no type hints: the signature is logged explicitly
        """model_input: a list of prompts, or a DataFrame whose first column holds them.
        params: max_new_tokens (default 48), temperature (default 0: greedy)."""
        from quillan.data.tokenizer import prompt_text
        from quillan.inference import complete

        if hasattr(model_input, "iloc"):
            model_input = model_input.iloc[:, 0].tolist()
        prompts = [prompt_text({"prompt": str(p)}) for p in model_input]
        params = params or {}  # the logged signature declares both, with these defaults
        return complete(self.model, self.tokenizer, prompts, int(params.get("max_new_tokens", 48)),
                        float(params.get("temperature", 0.0)))


mlflow.models.set_model(QuillanPyfunc())
