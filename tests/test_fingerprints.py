"""Resume fingerprints and harvest ids are the same as before the typed settings: an old registry's
work folders and harvests are found again. The expected digests were computed with the code at
346044a (the dict-based settings) on these exact inputs."""

import pytest

from generator.cvae_service import CVAESettings, cvae_fingerprint
from generator.dnd_service import DnDSettings, dnd_fingerprint
from generator.errors import GeneratorError
from generator.trainset import TrainingSet

ADAPTERS = [{"ref": "add-ckpt@1", "digest": "a" * 64, "task": "add"},
            {"ref": "rev-ckpt@1", "digest": "b" * 64, "task": "rev"}]
PROMPTS = {"add": ["What is 2 plus 3?"], "rev": ["Reverse cat."]}
CONFIG = {"prompt_tokens": 8, "n_layers": 2}


def training_set() -> TrainingSet:
    return TrainingSet(checkpoints={}, prompts=PROMPTS, adapters=ADAPTERS, base_model="base", base_fingerprint="f",
                       registry_layout="l", peft_fields={})


def test_dnd_fingerprint_is_unchanged():
    # options as a caller passes them: an int grad_clip stays an int, weight_decay becomes a float
    options = {"seed": 3, "grad_clip": 1, "weight_decay": 0, "center": "token", "spread_weighting": 1,
               "prompt_tokens": 8, "save_every": None}
    settings, decoder = DnDSettings.from_options(steps=5, lr=1e-2, batch_size=2, n_prompts=4, options=options)
    assert decoder == {"prompt_tokens": 8}
    assert dnd_fingerprint(training_set(), CONFIG, "enc-id", settings, "dnd", "fp32") == \
        "bc3211cd7c30189b59ad1123d492471524a21944188e357563db6fa2fcfb64c6"
    assert dnd_fingerprint(training_set(), CONFIG, "enc-id", settings, "dnd", "bf16") == \
        "0c6308a388393eb18c02f24052e87a4cc251f3bd7e30ed8a0d7c8b36f862da6e"
    defaults, _ = DnDSettings.from_options(steps=5, lr=1e-3, batch_size=8, n_prompts=16, options={})
    assert dnd_fingerprint(training_set(), CONFIG, "enc-id", defaults, "dnd", "fp32") == \
        "a651d527f532ca71399887c7d1a8b14d4499965c6dd9da12c7f28c3210b205de"


def test_cvae_fingerprint_is_unchanged():
    settings, model = CVAESettings.from_options(steps=5, lr=3e-3, batch_size=6, options={"latent_dim": 4})
    assert model == {"latent_dim": 4}
    condition = {"format": "icm-task-vector/base-last-token-mean/1", "max_length": settings.max_length, "chat": True,
                 "hidden_size": 32}
    assert cvae_fingerprint(training_set(), CONFIG, "base-id", condition, settings, "cvae", "fp32") == \
        "831ed4a3f6167de7706299b8f10d4e992005e13417ef81be01f1adc3273880bd"


def test_settings_refuse_what_the_old_option_dicts_refused():
    with pytest.raises(GeneratorError, match="unknown generator option"):
        DnDSettings.from_options(steps=5, lr=1e-3, batch_size=8, n_prompts=16, options={"kl_weight": 1})
    with pytest.raises(GeneratorError, match="must be >= 1"):
        DnDSettings.from_options(steps=0, lr=1e-3, batch_size=8, n_prompts=16, options={})
    with pytest.raises(GeneratorError, match="unknown CVAE option"):
        CVAESettings.from_options(steps=5, lr=1e-3, batch_size=4, options={"n_layers": 2})
    with pytest.raises(GeneratorError, match="kl_weight must be >= 0"):
        CVAESettings.from_options(steps=5, lr=1e-3, batch_size=4, options={"kl_weight": -1})


def test_harvest_id_and_resume_fingerprint_are_unchanged():
    from harvest.service import harvest_id
    from harvest.tasks import Example, make_task
    from harvest.train import HarvestConfig, _fingerprint

    train = [Example(f"What is {a} plus {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6)]]
    task = make_task("pin_add", train, [Example("What is 7 plus 8?", "15")], description="pinned")
    config = HarvestConfig(steps=20, n_checkpoints=2)
    assert harvest_id(task, config, "base-id") == "bbc778342fc81264"
    assert harvest_id(task, config, "base-id", "bf16") == "205ee6756b7ee795"
    assert _fingerprint(config, "base-id", train) == "835c0f71bcc14a912dcf2dcce7312f756de18b9437ce3efdce9ccbebc377caed"
    assert _fingerprint(config, "base-id", train, "bf16") == \
        "f0cdbf94822c519d63d68ebe83b3b5469132b80c01ecd918b42c821acce506d8"
