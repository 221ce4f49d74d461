"""Every option of every config group composes and validates; bad values name their key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from src.config import PROJECT_ROOT, ConfigError, Settings, compose_config, settings_from
from src.search.settings import search_settings_from
from tests.conftest import TINY, runs_of

GROUP_OPTIONS = {
    "data": ["cifar10", "image_folder", "npz", "synthetic"],
    "model": ["mobilenetv2", "mobilenetv2_cifar", "resnet8", "file"],
    "train": ["default"],
    "prune": ["none", "flat", "layer", "tfmot", "channel"],
    "quant": ["none", "dynamic", "int8", "float16"],
    "distill": ["none", "kd"],
    "tracking": ["mlflow"],
    "measure": ["default"],
    "paths": ["default"],
    "experiment": ["quick", "reference_oneshot", "reference_tfmot", "frontier_resnet8",
                   "mlperf_resnet8"],
    "search": ["accuracy_per_mb", "pareto", "pareto_models", "device"],
}


def test_group_options_match_conf_folder():
    from src.config import PROJECT_ROOT

    for group, options in GROUP_OPTIONS.items():
        found = sorted(p.stem for p in (PROJECT_ROOT / "conf" / group).glob("*.yaml"))
        assert found == sorted(options), group


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, options in GROUP_OPTIONS.items() for o in options]
)
def test_every_option_composes_and_validates(make_cfg, tmp_path, group, option):
    extra = {"image_folder": ["data.path=/some/folder"], "npz": ["data.path=/some/x.npz"],
             "file": ["model.path=/some/model.keras"]}.get(option, [])
    cfg = make_cfg(f"{group}={option}", *extra, tiny=False)
    settings = settings_from(cfg)
    assert isinstance(settings, Settings)
    if group == "search":
        assert search_settings_from(cfg).study_name == option
        return
    if group == "experiment":
        return  # each is a diff of the defaults; test_*_experiment check the interesting ones
    node = getattr(settings, group)
    if group == "prune":
        assert node.method == option
    elif group == "quant":
        assert node.mode == {"none": "none"}.get(option, option)
    elif group in ("data", "model"):
        assert node.name == option


def test_defaults_point_into_project_mlruns(make_cfg, tmp_path):
    settings = settings_from(make_cfg())
    assert settings.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert settings.paths.cache_dir.startswith(str(tmp_path / "mlruns"))
    assert settings.data.image_size == settings.model.input_size


def test_quick_experiment_is_a_diff_of_the_defaults(make_cfg):
    settings = settings_from(make_cfg("experiment=quick", tiny=False))
    assert settings.data.name == "synthetic" and settings.model.name == "resnet8"
    assert settings.train.epochs == 8


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["prune=flat", "prune.rate=1.5"], "prune.rate"),
        (["prune=flat", "prune.rate=1.0"], "prune.rate"),
        (["prune=layer", "prune.rate=-0.1"], "prune.rate"),
        (["prune=flat", "prune.rate=abc"], "prune.rate"),
        (["prune=flat", "prune.layer_types=[Conv3D]"], "prune.layer_types"),
        (["prune=tfmot", "prune.final_sparsity=1.2"], "prune.final_sparsity"),
        (["prune=tfmot", "prune.finetune_epochs=0"], "prune.finetune_epochs"),
        (["prune=tfmot", "prune.begin=0.9", "prune.end=0.5"], "prune.begin"),
        (["prune=tfmot", "prune.layer_types=[Conv2D,DepthwiseConv2D]"], "prune.layer_types"),
        (["train.epochs=0"], "train.epochs"),
        (["train.optimizer=rmsprop"], "train.optimizer"),
        (["train.momentum=1.5"], "train.momentum"),
        (["train.schedule=step"], "train.schedule"),
        (["train.lr_decay=0"], "train.lr_decay"),
        (["train.augment.rotation=-5"], "train.augment.rotation"),
        (["+prune.unknown_key=1"], "prune.unknown_key"),
        (["data.val_fraction=1.0"], "data.val_fraction"),
        (["objective=speed"], "objective"),
        (["quant=int8", "quant.representative_samples=0"], "quant.representative_samples"),
    ],
)
def test_bad_values_fail_naming_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        settings_from(make_cfg(*overrides))


def test_an_unknown_key_is_named_with_the_nearest_setting_beside_it(make_cfg):
    with pytest.raises(ConfigError, match=r"^prune.rat: no such setting \(did you mean "
                                          r"prune.rate\?\)$"):
        settings_from(make_cfg("+prune.rat=0.5"))
    # nested: the settings of train.augment, not of train
    with pytest.raises(ConfigError, match=r"^train.augment.rotatio: no such setting \(did you "
                                          r"mean train.augment.rotation\?\)$"):
        settings_from(make_cfg("+train.augment.rotatio=3"))


def test_reference_experiments_use_the_stock_model(make_cfg):
    oneshot = settings_from(make_cfg("experiment=reference_oneshot", tiny=False))
    tfmot = settings_from(make_cfg("experiment=reference_tfmot", tiny=False))
    assert oneshot.model.name == tfmot.model.name == "mobilenetv2"
    assert (tfmot.prune.initial_sparsity, tfmot.prune.final_sparsity) == (0.5, 0.9)
    assert tfmot.quant.mode == "int8"


def test_cross_group_checks(make_cfg):
    with pytest.raises(ConfigError, match="^prune.layer_types: resnet8 has no DepthwiseConv2D"):
        settings_from(make_cfg("prune=flat", "prune.layer_types=[DepthwiseConv2D]"))
    with pytest.raises(ConfigError, match="^data.image_size: 24 differs"):
        settings_from(make_cfg("data.image_size=24"))


def test_missing_required_path_names_the_key(make_cfg):
    with pytest.raises(ConfigError, match=r"^data\.path"):
        settings_from(make_cfg("data=image_folder", tiny=False))


def test_a_fixed_value_sweeps_with_the_group_options(tmp_path):
    """Every prune option extends one schema, so prune.rate is valid beside prune=flat,layer."""
    done = subprocess.run(
        [sys.executable, "-m", "src.run", "--multirun", "experiment=quick", "prune=flat,layer",
         "prune.rate=0.5", f"paths.root={tmp_path}", *TINY["data"], *TINY["model"],
         *TINY["train"]],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = runs_of(compose_config([f"paths.root={tmp_path}"]))
    jobs = [r for r in runs if "sweep_job" in r.data.tags]
    assert sorted(r.data.params["prune.method"] for r in jobs) == ["flat", "layer"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    assert all(abs(r.data.metrics["sparsity_global"] - 0.5) < 0.01 for r in jobs)
