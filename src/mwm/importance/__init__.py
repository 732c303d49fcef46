"""Importance maps computed once per image and written as a saliency-map manifest (:mod:`mwm.importance.maps`) that
the saliency masking strategies read: MedIM's report attention (:mod:`mwm.importance.medim`), M&M's Meijering ridge
response (:mod:`mwm.importance.meijering`). Submodules are imported where used (they pull in models / filters)."""
