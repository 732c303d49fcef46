"""A small prompt library: short phrases and descriptive sentences per modality and target.

MWM (§3.2, Table 1) found short anatomical phrases work about as well as longer descriptions for
BiomedCLIP; both styles are here so users can compare with `mwm localize-eval`.
"""

from __future__ import annotations

PROMPTS: dict[str, dict[str, dict[str, str]]] = {
    "brain_mri": {
        "tumor": {
            "short": "brain tumor",
            "sentence": "an MRI scan of the brain showing a tumor mass with abnormal signal intensity",
        },
        "brain": {"short": "the brain", "sentence": "an axial MRI slice of the brain parenchyma inside the skull"},
        "edema": {"short": "peritumoral edema", "sentence": "a brain MRI showing edema around a lesion"},
    },
    "chest_xray": {
        "lungs": {"short": "the lungs", "sentence": "a chest X-ray showing both lung fields"},
        "pneumonia": {
            "short": "pneumonia opacity",
            "sentence": "a chest X-ray with patchy consolidation and opacity in the lungs due to pneumonia",
        },
        "heart": {"short": "the heart", "sentence": "a chest X-ray showing the cardiac silhouette"},
    },
    "chest_ct": {
        "nodule": {"short": "lung nodule", "sentence": "a chest CT slice showing a pulmonary nodule in the lung"},
        "tumor": {
            "short": "lung tumor",
            "sentence": "a chest CT scan showing a lung cancer mass in the pulmonary parenchyma",
        },
        "lungs": {"short": "the lungs", "sentence": "an axial chest CT slice showing both lungs"},
    },
    "phantom": {
        "lesion": {"short": "lesion", "sentence": "a head scan with one lesion"},
        "bright": {"short": "bright lesion", "sentence": "a head scan with a bright lesion"},
        "dark": {"short": "dark lesion", "sentence": "a head scan with a dark lesion"},
        "irregular": {"short": "irregular lesion", "sentence": "a head scan with an irregular lesion"},
    },
}


def get_prompt(modality: str, target: str, style: str = "short") -> str:
    """``get_prompt("brain_mri", "tumor")`` → "brain tumor"; a clear KeyError lists what exists."""
    try:
        return PROMPTS[modality][target][style]
    except KeyError:
        options = {m: sorted(t) for m, t in PROMPTS.items()}
        raise KeyError(f"no prompt for {modality}/{target}/{style}; available: {options}, styles short|sentence") from None
