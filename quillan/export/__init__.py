"""Exports of a trained Quillan model: packed ternary, dequantized FP16, bitsandbytes INT8/INT4,
and a per-module mixed plan. Each is a directory `model.safetensors` + `metadata.json`
(+ `tokenizer.json`), reloadable by `quillan.export.load(path)` alone. No pickles.

Every variant encodes the same trained network: the deployable ternary weights scale·q of each
BitLinear (never the latent training weights), in the format the variant names. Modules the
precision plan keeps in full precision (embeddings, norms, routers) are stored in FP16 and
computed in float32 on load.
"""

from quillan.export.convert import attach_grouped_experts, convert, dequantized_weight
from quillan.export.files import METADATA, TOKENIZER, WEIGHTS, export_tensors, load, save
from quillan.export.plan import BANKS, KERNELS, KINDS, VARIANTS, ExportConfig, module_kind, variant_plan

__all__ = ["BANKS", "KERNELS", "KINDS", "METADATA", "TOKENIZER", "VARIANTS", "WEIGHTS", "ExportConfig",
           "attach_grouped_experts", "convert", "dequantized_weight", "export_tensors", "load", "module_kind", "save",
           "variant_plan"]
