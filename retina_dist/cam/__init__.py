"""Class activation maps: where the model looked, rendered for clinicians and scored against lesion
masks where a dataset has them (the synthetic sets do)."""
