"""Adversarial safety fine-tuning (saferclip.training.adversarial): the schema's one-line errors,
the inner attacks against closed forms (token offsets on words only, L2 PGD's optimum of a
linear objective, an offset that swaps one word for another), the attacked batch raising the
method's own loss for every method, the adversarial terms in the training log, and a disabled
option that changes no run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from train_helpers import collate, compose_train, prepared

from saferclip.errors import ConfigError
from saferclip.locations import CONF_DIR
from saferclip.training.adversarial import (
    AdversarialConfig,
    adversarial_terms,
    batch_radii,
    content_positions,
    euclidean_objectives,
    hyperbolic_objectives,
    hysac_adversarial_terms,
    item_noise,
    token_pgd,
)
from saferclip.training.method import method_config

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (tests/conftest.py)

METHODS = ("safeclip", "saferclip", "hysac")


def preset(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())


# ---------------------------------------------------------------- the schema
BAD = {
    "negative epsilon": ({"epsilon_255": -1}, "method.adversarial.epsilon_255"),
    "epsilon beyond the pixel range": ({"epsilon_255": 300}, "method.adversarial.epsilon_255"),
    "zero steps": ({"steps": 0}, "method.adversarial.steps"),
    "fractional steps": ({"steps": 2.5}, "method.adversarial.steps"),
    "unknown text attack": ({"text_attack": "gcg"}, "method.adversarial.text_attack"),
    "enabled a word": ({"enabled": "yes"}, "method.adversarial.enabled"),
    "zero step size": ({"step_size_255": 0}, "method.adversarial.step_size_255"),
    "negative weight": ({"weight": -0.5}, "method.adversarial.weight"),
    "typo": ({"epsilon": 4}, "unknown keys ['epsilon']"),
    "nothing attacked": ({"enabled": True, "images": False, "text_attack": "none"}, "attack nothing"),
    "zero weight when on": ({"enabled": True, "weight": 0}, "method.adversarial.weight is 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adversarial_settings_are_one_line_naming_the_key(case):
    change, expected = BAD[case]
    for name in METHODS:
        method = preset(name)
        method["adversarial"].update(change)
        with pytest.raises(ConfigError) as error:
            method_config(method)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_every_preset_has_the_section_off_and_its_defaults_are_the_library_s():
    for name in METHODS:
        section = preset(name)["adversarial"]
        assert section["enabled"] is False
        assert AdversarialConfig.of(section) == AdversarialConfig()  # one set of defaults, written in the presets
        assert method_config(preset(name)).adversarial.enabled is False


def test_step_size_defaults_to_madry_s_rule_and_attacked_items_follow_the_switches():
    cfg = AdversarialConfig.of({"enabled": True, "epsilon_255": 6, "steps": 3})
    assert cfg.epsilon == pytest.approx(6 / 255) and cfg.step_size == pytest.approx(2.5 * 6 / 3 / 255)
    everything = {"safe_text", "unsafe_text", "safe_image", "unsafe_image"}
    assert cfg.attacked(everything) == ["unsafe_image", "unsafe_text"]
    assert AdversarialConfig.of({"preserve_safe": True}).attacked(everything) == [
        "unsafe_image",
        "unsafe_text",
        "safe_image",
        "safe_text",
    ]
    assert AdversarialConfig.of({"text_attack": "none"}).attacked({"unsafe_text", "unsafe_image"}) == ["unsafe_image"]
    assert AdversarialConfig().attacked({"unsafe_text", "safe_text"}) == [
        "unsafe_text"
    ]  # text-only data: no image to attack


def test_a_disabled_adversarial_section_leaves_the_run_key_unchanged(tmp_path, toy_world):
    from saferclip.app.pipelines.runs import run_key

    base = compose_train(tmp_path, toy_world, "method=saferclip")
    without = copy.deepcopy(base)
    OmegaConf.set_struct(without, False)
    del without.method["adversarial"]  # a config from before the option existed
    assert run_key(base) == run_key(without)
    assert run_key(
        compose_train(tmp_path, toy_world, "method=saferclip", "method.adversarial.enabled=true")
    ) != run_key(base)


# ---------------------------------------------------------------- the inner attacks, against closed forms
def test_content_positions_are_the_words_only():
    tokens = torch.tensor([[49406, 320, 736, 49407, 0, 0], [49406, 5, 49407, 0, 0, 0]])
    assert content_positions(tokens).tolist() == [
        [False, True, True, False, False, False],
        [False, True, False, False, False, False],
    ]


def test_token_pgd_reaches_the_optimum_of_a_linear_objective_inside_its_ball():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[False, True, True, False, False], [False, True, False, False, False]])
    radius = 0.7
    objective = lambda d: (d * w).sum(dim=(1, 2))  # noqa: E731
    # max of <w_t, d_t> over ||d_t|| <= r: d_t = r w_t / ||w_t|| at the masked positions, 0 elsewhere
    expected = radius * w / w.norm(dim=-1, keepdim=True) * mask.unsqueeze(-1)
    # from 0, one step of length r lands on it; from a random start in the ball, each step (a
    # vector of length r added to one of length r, then projected) halves the angle to it
    torch.testing.assert_close(
        token_pgd(objective, mask, 4, radius, step_size=radius, steps=1), expected, atol=1e-6, rtol=0
    )
    start = torch.rand(2, 5, 4, generator=g) * 2 - 1
    torch.testing.assert_close(token_pgd(objective, mask, 4, radius, radius, 30, start), expected, atol=1e-5, rtol=0)
    assert token_pgd(objective, mask, 4, radius, radius, 2, start).norm(dim=-1).max() <= radius + 1e-6


def test_a_token_offset_is_the_same_as_swapping_the_word(tmp_path):
    from saferclip.locations import BASE_CHECKPOINT
    from saferclip.model.build import build_clip, encode_tokens

    bundle = build_clip("saferclip-toy", str(BASE_CHECKPOINT))
    gun, knife = (bundle.tokenizer([f"a red circle with a {w}"]) for w in ("gun", "knife"))
    position = int((gun != knife).nonzero()[0, 1])
    table = bundle.model.token_embedding.weight.detach()
    offset = torch.zeros(*gun.shape, table.shape[1])
    offset[0, position] = table[knife[0, position]] - table[gun[0, position]]
    with torch.no_grad():
        torch.testing.assert_close(
            encode_tokens(bundle.model, gun, embedding_offset=offset),
            encode_tokens(bundle.model, knife),
            atol=1e-5,
            rtol=1e-4,
        )
        torch.testing.assert_close(
            encode_tokens(bundle.model, gun, embedding_offset=torch.zeros_like(offset)),
            encode_tokens(bundle.model, gun),
        )


def test_each_item_draws_its_own_noise_whatever_the_batch():
    index = torch.tensor([7, 3, 11, 5])
    whole = item_noise(index, (3, 2, 2), seed=1, step=4)
    torch.testing.assert_close(item_noise(index[2:], (3, 2, 2), seed=1, step=4), whole[2:])  # another rank's half
    assert whole.abs().max() <= 1 and not torch.equal(whole, item_noise(index, (3, 2, 2), seed=1, step=5))


# ---------------------------------------------------------------- one step of every method
ATTACK = (
    "method.adversarial.enabled=true",
    "method.adversarial.epsilon_255=16",
    "method.adversarial.preserve_safe=true",
)


@pytest.fixture(scope="module")
def modules(tmp_path_factory, toy_world):
    tmp = tmp_path_factory.mktemp("adversarial")
    out = {}
    for name in METHODS:
        module, datamodule = prepared(
            compose_train(tmp / name, toy_world, f"method={name}", *ATTACK, cache_dir=tmp / "cache")
        )
        out[name] = (module, collate(datamodule.train_set, range(16)))
    return out


def _clean_and_attacked(module, batch):
    """The method's adversarial terms on the clean items and on the attacked ones (one call each),
    and the objectives before and after."""
    hyperbolic = hasattr(module, "head")
    if hyperbolic:
        features = module.lifted(batch, module.loss.required_inputs())
        given = {}
        radii = batch_radii(features, module.head.curvature(), module.head.config.traversal_percentile)
        objectives = hyperbolic_objectives(features, module.head.curvature(), radii)
    else:
        from saferclip.app.engine.module import available_inputs
        from saferclip.training.losses import FROZEN_INPUTS, WEIGHT_INPUTS

        features = module.encode(batch, module.loss.required_inputs(available_inputs(batch)))
        given = {k: batch[k] for k in FROZEN_INPUTS + WEIGHT_INPUTS if k in batch}
        objectives = euclidean_objectives(features, given)
    kinds = module.attacked_kinds(features, objectives)
    attacked = module.adversarial.attack(module.attack_encoders(), batch, objectives, 0, kinds)
    clean = {k: features[k] for k in kinds}

    def terms(items):
        if hyperbolic:
            return hysac_adversarial_terms(module.loss, module.head, features, items, radii, 1.0)
        return adversarial_terms(module.loss, {**features, **given}, items, 1.0)

    gains = {k: float((objectives[k](attacked[k]) - objectives[k](clean[k])).mean().detach()) for k in kinds}
    return terms(clean), terms(attacked), gains


@pytest.mark.parametrize("name", METHODS)
def test_the_attacked_batch_raises_the_method_s_loss_before_the_step(modules, name):
    module, batch = modules[name]
    (clean_total, clean_terms), (attacked_total, attacked_terms), gains = _clean_and_attacked(module, batch)
    assert set(gains) == {"unsafe_image", "unsafe_text", "safe_image", "safe_text"}
    assert all(g > 0 for g in gains.values()), gains  # every inner maximisation climbed its own objective
    assert float(attacked_total.detach()) > float(clean_total.detach()), (clean_terms, attacked_terms)
    assert clean_terms.keys() == attacked_terms.keys() and all(k.startswith("adv_") for k in attacked_terms)
    assert all(p.grad is None for p in module.parameters())  # the attacks never touch the parameters' gradients


@pytest.mark.parametrize("name", METHODS)
def test_the_step_adds_the_adversarial_terms_and_they_train(modules, name):
    module, batch = modules[name]
    module.zero_grad(set_to_none=True)
    total, terms = module.loss_step(batch)
    adversarial = {k for k in terms if k.startswith("adv_")}
    expected = (
        {"adv_relative_image", "adv_live_relative_text"}
        if name == "saferclip"
        else (
            {"adv_xmodal_image_redirection", "adv_text_redirection"}
            if name == "safeclip"
            else {"adv_radius_image", "adv_radius_text", "adv_contrastive_unsafe", "adv_entailment_safe"}
        )
    )
    assert expected <= adversarial
    assert math.isfinite(float(total))
    total.backward()
    assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("name", METHODS)
def test_training_logs_the_adversarial_terms_and_the_step_time(tmp_path, toy_world, name):
    from saferclip.app.engine.fit import train

    result = train(
        compose_train(tmp_path, toy_world, f"method={name}", "debug=fast_dev_run", "method.adversarial.enabled=true")
    )
    logged = {k.split("/", 1)[1] for k in result if k.startswith("train/")}
    assert any(k.startswith("adv_") for k in logged), logged
    assert {"time/step_seconds", "time/adv_attack_seconds"} <= set(result)
    assert all(math.isfinite(v) for k, v in result.items() if k.startswith(("train/", "val/")))


def test_the_main_job_adds_adversarial_runs_by_one_switch_and_leaves_the_default_alone():
    from hydra import initialize_config_dir

    from saferclip.app.hydra_utils import CONF_DIR
    from saferclip.app.pipelines.runs import check_runs, compose, evaluated_models, main_runs

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = main_runs(compose("main", []))
        both = main_runs(
            compose("main", ["adversarial=true", 'adversarial_overrides=["method.adversarial.epsilon_255=8"]'])
        )
        with pytest.raises(ConfigError, match="adversarial must be true or false"):
            main_runs(compose("main", ["adversarial=maybe"]))
        # a typo inside the list is named as a command line's would be, with its run
        typo = main_runs(
            compose("main", ["adversarial=true", 'adversarial_overrides=["method.adversarial.epsilon=8"]'])
        )
        with pytest.raises(
            ConfigError,
            match=r"run 'safeclip_adv': method.adversarial.epsilon: no such key; did you mean method.adversarial.epsilon_255\?",
        ):
            check_runs(typo)
        check_runs(both)  # the right key passes
    assert list(default) == ["safeclip", "saferclip", "hysac"]
    assert list(both) == [*default, "safeclip_adv", "saferclip_adv", "hysac_adv"]
    for name, overrides in default.items():
        assert both[name] == overrides  # the default runs keep their overrides, so their keys and results
        assert both[f"{name}_adv"] == [
            *overrides,
            "method.adversarial.enabled=true",
            "method.adversarial.epsilon_255=8",
        ]
    assert set(evaluated_models("hysac_adv", {"pretrained": "x"}, "hysac")) == {
        "hysac_adv_safe",
        "hysac_adv_moderation",
    }
