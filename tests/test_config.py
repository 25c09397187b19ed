"""Recipe loading, overrides and the validation rules: each error names its key."""

import pytest

from maect.config import ConfigError, available_recipes, load_config, parse_overrides


def test_recipes_load_and_override():
    names = available_recipes()
    assert {"mae/fmnist_vit_t", "mae/in1k_vit_b16", "mae/in1k_vit_l16", "mae/in1k_vit_h14"} <= set(
        names
    )
    for name in names:
        load_config(name)
    cfg = load_config(
        "mae/fmnist_vit_t", ["trainer.epochs=3", "data.subset=100", "optim.base_lr=2e-4"]
    )
    assert cfg.trainer.epochs == 3 and cfg.data.subset == 100
    assert cfg.optim.base_lr == pytest.approx(2e-4)
    large = load_config("mae/in1k_vit_l16")
    assert (large.model.embed_dim, large.model.depth, large.trainer.epochs) == (1024, 24, 800)


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null"]) == {"a": {"b": 1, "c": True}, "d": None}


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("trainer.epoch=3", r"unknown key 'trainer.epoch'.*did you mean 'trainer.epochs'"),
        ("modle.depth=3", r"unknown key 'modle'.*did you mean 'model'"),
        ("trainer.epochs=abc", r"trainer.epochs expects int"),
        ("data.subset=1.5", r"data.subset expects int or null"),
        ("model.img_size=30", r"model.img_size must be a positive multiple of model.patch_size=4"),
        ("mae.mask_ratio=1.0", r"mae.mask_ratio must be in the open interval \(0, 1\)"),
        ("mae.mask_ratio=0", r"mae.mask_ratio must be in the open interval"),
        ("mae.mask_ratio=-0.1", r"mae.mask_ratio"),
        ("mae.views=0", r"mae.views must be >= 1"),
        ("data.name=mnist", r"data.name must be one of"),
        ("method=byol", r"method must be one of"),
        ("data.crop_scale=[0.5, 0.2]", r"data.crop_scale"),
        ("model.num_heads=5", r"model.embed_dim must be divisible by 4 and by model.num_heads=5"),
        ("trainer.precision=fp8", r"trainer.precision must be one of"),
        ("trainer.epochs=0", r"trainer.epochs must be >= 1"),
        ("data.hflip=yes please", r"data.hflip expects bool"),
        ("trainer", r"not of the form dotted.key=value"),
    ],
)
def test_config_errors_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("mae/fmnist_vit_t", [override])


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match=r"unknown recipe 'mae/fmnist'.*mae/fmnist_vit_t"):
        load_config("mae/fmnist")


def test_yaml_syntax_error_in_a_recipe_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("method: mae\ntrainer:\n  epochs: [1, 2\n  seed: 0\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}:4: invalid YAML: "):
        load_config(str(recipe))


def test_yaml_syntax_error_in_an_override_names_the_override():
    with pytest.raises(
        ConfigError,
        match=r"^override 'data.crop_scale=\[0.2,': the value is not valid YAML",
    ):
        load_config("mae/fmnist_vit_t", ["data.crop_scale=[0.2,"])


def test_a_recipe_base_cycle_is_an_error(tmp_path):
    selfish = tmp_path / "self.yaml"
    selfish.write_text(f"base: {selfish}\nmethod: mae\n")
    with pytest.raises(ConfigError, match=rf"recipe base cycle: {selfish} -> {selfish}$"):
        load_config(str(selfish))
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match=rf"recipe base cycle: {a} -> {b} -> {a}$"):
        load_config(str(a))


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nothing\.yaml"):
        load_config(str(tmp_path / "nothing.yaml"))


def test_maect_head_temperature_must_be_positive():
    with pytest.raises(ConfigError, match="maect.head_temperature must be > 0, got 0.0"):
        load_config("maect/fmnist_vit_t", ["maect.head_temperature=0"])


@pytest.mark.parametrize("recipe", ["maect/fmnist_vit_t", "refiner/fmnist_vit_t"])
@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("views", "strong", "must be one of min, byol, simclr"),
        ("pooling", "max", "must be one of cls, mean"),
        ("temperature", "0", "must be > 0, got 0.0"),
        ("topk", "0", "must be >= 1, got 0"),
        ("queue_size", "1", "must be >= {section}.topk, got 1"),
        ("proj_dim", "0", "must be >= 1, got 0"),
        ("encoder_ema", "1", "must be in [0, 1), got 1.0"),
        ("layer_decay", "0", "must be in (0, 1], got 0.0"),
        ("head_epochs", "-1", "must be >= 0, got -1"),
    ],
)
def test_the_nnclr_sections_share_their_rules(recipe, key, value, rule):
    section = recipe.split("/")[0]
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [f"{section}.{key}={value}"])
    assert str(err.value) == f"{section}.{key} {rule.format(section=section)}"
