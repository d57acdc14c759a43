"""Sampling callbacks refuse bad settings in setup, before any work, naming no config key they cannot know."""

from __future__ import annotations

import hydra
import pytest

from conftest import compose_config
from fm_lightning.callbacks import FIDCallback


def test_guidance_on_an_unconditional_model_names_the_fid_callback_by_its_metric():
    """The CIFAR recipe's FID callbacks are callbacks.fid_dopri5 and callbacks.fid_euler100 (fm-cli's,
    entries of a list): the message names the one at fault by its metric key, not as callbacks.fid."""
    module = hydra.utils.instantiate(compose_config([]).model)  # unconditional
    with pytest.raises(ValueError, match=r"^FIDCallback \(key val/fid_dopri5\): guidance=2.0 needs a class-conditional "
                                         r"model.* \(set this callback's guidance to null\)$"):
        FIDCallback(num_samples=4, guidance=2.0, key="val/fid_dopri5").setup(None, module, "fit")


def test_a_fid_reference_that_is_a_folder_is_refused_before_any_statistics(tmp_path):
    module = hydra.utils.instantiate(compose_config([]).model)
    with pytest.raises(ValueError, match="is a folder; give the path of an .npz file"):
        FIDCallback(num_samples=4, reference=str(tmp_path)).setup(None, module, "fit")
