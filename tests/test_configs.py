"""Every option of every Hydra config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_config
from fm_lightning.train import CONFIG_DIR

CONFIGS = Path(CONFIG_DIR)
# Groups whose options are instantiated as the node of the same name in the composed config.
NODE_OF_GROUP = {"data": "data", "model": "model", "model/net": "model.net", "flow": "model.flow",
                 "trainer": "trainer", "callbacks": "callbacks", "logger": "logger"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _node(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _instantiate_node(node):
    if node is None:
        return []
    if "_target_" in node:
        return [instantiate(node)]
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


GROUP_OPTIONS = [(g, o) for g in NODE_OF_GROUP for o in _options(g)]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_instantiates(group, option, tmp_path):
    extra = []
    if group == "trainer":
        # GPU presets are instantiated on the CPU here; FSDP's strategy needs CUDA, so it is
        # instantiated on its own below and the trainer with the default strategy.
        extra = ["trainer.devices=1", "trainer.accelerator=cpu"]
        if option == "fsdp":
            strategy = instantiate(compose_config(["trainer=fsdp"], tmp_path).trainer.strategy)
            assert type(strategy).__name__ == "FSDPStrategy"
            extra.append("trainer.strategy=auto")
    if group == "model/net" and option.startswith("unet"):
        # Image nets link channels / size / classes to the image data config (native size per preset).
        extra = ["data=images", f"data.image_size={ {'unet_cifar10': 32, 'unet_mnist': 28}.get(option, 8) }"]
    cfg = compose_config([f"{group}={option}", *extra], tmp_path)
    objs = _instantiate_node(_node(cfg, NODE_OF_GROUP[group]))
    if group not in ("callbacks", "logger") or option not in ("none",):
        assert objs, f"{group}={option} instantiated nothing"


@pytest.mark.parametrize("option", _options("experiment") + _options("debug"))
def test_every_experiment_and_debug_preset_builds_data_and_model(option, tmp_path):
    group = "experiment" if (CONFIGS / "experiment" / f"{option}.yaml").exists() else "debug"
    cfg = compose_config([f"{group}={option}"], tmp_path)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    assert model.hparams.net["class_path"].startswith("fm_lightning.nets")
    assert datamodule is not None


def test_unknown_group_option_names_the_choices(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="otcfm"):
        compose_config(["flow=nope"], tmp_path)


@pytest.mark.parametrize("option", ["toy_reflow", "toy_table"])
def test_a_preset_sets_its_own_task_name(option, tmp_path):
    # The presets' task_name (and so their logs/<task_name>/ folder) wins over train.yaml's default.
    assert compose_config([f"experiment={option}"], tmp_path).task_name == {"toy_reflow": "reflow"}.get(option, option)
