"""What m2iv knows about a model: where its text decoder layers are, what each layer looks like
(structural discovery, :mod:`.discover`), the few per-family facts structure cannot give (the
family table, :mod:`.table`), whether vectors fit it (:mod:`.fit`), and where it computes
(:mod:`.devices`).

Any LVLM or LM whose decoder layers have a style of :data:`m2iv.patch.styles.STYLES` is
steered without a table row; a layer of any other shape is refused with an error naming it.
"""
from .devices import module_device, module_dtype
from .discover import LayerSpec, ModelInfo, describe
from .fit import ModelSpec, check_fits, incompatibility
from .table import FAMILIES, Family, family_of

__all__ = ["describe", "ModelInfo", "LayerSpec", "Family", "FAMILIES", "family_of",
           "ModelSpec", "incompatibility", "check_fits", "module_device", "module_dtype"]
