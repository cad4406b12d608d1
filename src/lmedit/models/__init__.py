"""Model access: loading (bundled, GGUF, local, hub), structure discovery, fingerprints."""
from lmedit.models.bundled import BUNDLED, DEFAULT_MODEL, bundled_models, cache_dir
from lmedit.models.loading import Model, load_model, require_model, weight_fingerprint
from lmedit.models.spec import ModelSpec, discover_spec, get_module, mlp_out_weight

__all__ = ["BUNDLED", "DEFAULT_MODEL", "Model", "ModelSpec", "bundled_models", "cache_dir", "discover_spec",
           "get_module", "load_model", "mlp_out_weight", "require_model", "weight_fingerprint"]
