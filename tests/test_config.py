import json

import pytest

from vlds.config import (
    PRESETS,
    ConfigError,
    build_config,
    config_from_dict,
    global_batch,
    parse_cli,
    validate,
)


def test_default_is_tiny_and_valid():
    cfg = build_config()
    assert cfg.preset == "tiny" and cfg.model.lm == cfg.model.vision_pretrained == "synthetic"
    validate(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_validates(name):
    validate(build_config(name))


def test_real_presets_follow_the_reference_recipe():
    bart = build_config("bart-base")
    assert bart.model.lm == "facebook/bart-base" and bart.model.extra_tokens == 200
    assert bart.model.vision == "RN101" and bart.model.vision_pretrained == "openai"
    assert (bart.train.lr, bart.train.epochs, bart.data.batch_size) == (1e-3, 20, 500)
    assert (bart.train.adam_eps, bart.train.weight_decay, bart.train.grad_clip) == (1e-6, 0.01, 5.0)
    assert build_config("t5-base").data.batch_size == 300
    video = build_config("bart-base-video")
    assert (video.train.epochs, video.train.lr, video.model.vision) == (7, 3e-4, "ViT-B-32")


def test_overrides_are_typed():
    cfg = build_config(
        "tiny",
        {
            "train.lr": "3e-4",
            "data.batch_size": "8",
            "peft.train_layernorms": "false",
            "model.arch": "bart",
        },
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 8 and cfg.peft.train_layernorms is False
    assert build_config("tiny", {"peft.train_layernorms": "none"}).peft.train_layernorms is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"data.batch_size": "eight"}, "data.batch_size='eight' is not a valid int"),
        ({"data.batch_size": "2.5"}, "not a valid int"),
        ({"train.lr": "fast"}, "not a valid float"),
        ({"peft.train_layernorms": "maybe"}, "not a valid bool"),
        ({"train.learning_rate": "1"}, "valid keys in [train]: adam_beta1"),
        ({"optim.lr": "1"}, "section one of model, peft, data, train, eval"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", overrides)
    assert needle in str(e.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; valid presets: tiny, "):
        build_config("huge")


def test_cli_parsing_keeps_launcher_flags(tmp_path):
    f = tmp_path / "best.json"
    f.write_text(json.dumps({"train": {"lr": 5e-4}, "peft.reduction_factor": 4}))
    cfg, rest = parse_cli(
        ["--local_rank=0", "--config", str(f), "--train.epochs=3", "--deepspeed", "ds.json"]
    )
    assert rest == ["--local_rank=0", "--deepspeed", "ds.json"]
    assert (cfg.train.lr, cfg.peft.reduction_factor, cfg.train.epochs) == (5e-4, 4, 3)
    # `--key value` as well as `--key=value`, launcher flags kept in order
    cfg2, rest2 = parse_cli(
        ["--local_rank=0", "--data.root", "/data/vl shards", "--train.lr", "-1e-3", "--deepspeed"]
    )
    assert (cfg2.data.root, cfg2.train.lr, rest2) == ("/data/vl shards", -1e-3, rest[:2])
    for argv in (["--train.epochs"], ["--train.epochs", "--deepspeed", "ds.json"]):
        with pytest.raises(ConfigError, match="needs a value: --train.epochs=VALUE or --train"):
            parse_cli(argv)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_cli(["--config", str(tmp_path / "nope.json")])


def test_round_trip_through_json():
    cfg = build_config("tiny", {"train.lr": "2e-3", "peft.train_layernorms": "true"})
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_reduction_factor_must_divide_d_model():
    from vlds.peft import METHODS

    def check(method, r, d_model=768):
        peft = build_config("tiny", {"peft.method": method, "peft.reduction_factor": str(r)}).peft
        METHODS[method](peft, ["vqa"]).check(d_model, "t5")

    check("single_adapter", 8)
    with pytest.raises(
        ConfigError, match=r"reduction_factor=7 does not divide d_model=768.*one of"
    ):
        check("single_adapter", 7)
    with pytest.raises(ConfigError, match="does not divide"):
        validate(build_config("tiny", {"peft.reduction_factor": "3"}))
    # one check, by the method's own flag: methods without a bottleneck ignore the factor
    assert {m for m, c in METHODS.items() if c.uses_bottleneck} == {
        "single_adapter",
        "multiple_adapters",
        "half_shared_adapter",
        "hyperformer",
        "single_compacter",
        "multiple_compacters",
    }
    check("single_lora", 7)
    validate(build_config("tiny", {"peft.method": "single_lora", "peft.reduction_factor": "3"}))


def test_every_owner_registers_its_check():
    from vlds.config import CHECKS

    owners = {name.rsplit(".", 1)[0] for name in CHECKS}
    assert owners == {
        "vlds.data.tasks",
        "vlds.data.mixing",
        "vlds.data.decode",
        "vlds.peft.registry",
        "vlds.kernels",
        "vlds.trackers",
        "vlds.engine",  # train.decay_exempt
        "vlds.model.vl",  # model.visual_input, eval.nlvr_predict / no_repeat_ngram_size,
        # model.vision_train
        "vlds.pretrain",  # train.stage
    }


def test_field_roles_replace_hand_kept_key_lists():
    from vlds.config import keys_with_role

    match, run = set(keys_with_role("match")), set(keys_with_role("run"))
    assert not match & run
    # what a resume must keep: the model, the method, the data order and the batches
    assert {
        "model.arch",
        "model.lm",
        "model.d_model",
        "peft.method",
        "peft.reduction_factor",
        "data.tasks",
        "data.batch_size",
        "data.task_batch_scale",
        "data.split",
        "data.mixing",
        "data.mixing_weights",
        "data.mixing_temperature",
        "train.grad_accum",
        "train.global_batch_size",
        "train.seed",
    } <= match
    # where and how a run executes or is scored (left out of a tuned best_config.json)
    assert {
        "data.num_workers",
        "eval.max_samples",
        "eval.caption_beams",
        "eval.every",
        "train.out_dir",
        "train.resume",
        "train.save_every",
        "train.keep_last",
        "train.log_every",
        "train.handle_signals",
        "eval.java_metrics",
    } <= run
    # the recipe a resume must keep, though a search tunes it (best_config.json keeps it)
    assert {"train.lr", "train.weight_decay", "train.warmup_ratio", "train.precision"} <= match
    # free to change on resume: the schedule's length, the data's location, the kernel choice
    resume = set(keys_with_role("resume"))
    assert {"train.max_steps", "train.epochs", "data.root", "peft.fused_kernel"} <= resume
    assert not resume & (match | run)
    # every field has a role: a new field is compared on resume unless it says otherwise
    from dataclasses import fields

    from vlds.config import _SECTION_TYPES, SECTIONS

    every = {f"{s}.{f.name}" for s in SECTIONS for f in fields(_SECTION_TYPES[s])}
    assert every == match | run | resume


def test_grad_accum_and_global_batch_cannot_disagree():
    cfg = build_config("tiny", {"train.grad_accum": "2", "train.global_batch_size": "64"})
    with pytest.raises(ConfigError, match="both set; give one"):
        validate(cfg)


def test_global_batch_identity_and_nearest_multiple():
    # no global batch: micro x accumulation x world
    cfg = build_config("tiny", {"data.batch_size": "4", "train.grad_accum": "3"})
    assert global_batch(cfg, 2) == (24, 3, 4)
    # a global batch the world divides: exact, accumulation makes up what micro-batches cannot
    cfg = build_config("tiny", {"data.batch_size": "4", "train.global_batch_size": "32"})
    assert global_batch(cfg, 2) == (32, 4, 4)
    # bart-base's 500 (data.batch_size 500 = the most a rank holds): one rank takes it whole,
    # 8 ranks 62 each (500 / 8 = 62.5 -> the nearest multiple, 496), 3 ranks 167 (501)
    cfg = build_config("tiny", {"data.batch_size": "500", "train.global_batch_size": "500"})
    assert global_batch(cfg, 1) == (500, 1, 500)
    assert global_batch(cfg, 8) == (496, 1, 62)
    assert global_batch(cfg, 3) == (501, 1, 167)
    # ranks that hold 40: ceil(500 / 320) = 2 accumulation steps of 500 / 16 -> 31
    cfg = build_config("tiny", {"data.batch_size": "40", "train.global_batch_size": "500"})
    assert global_batch(cfg, 8) == (496, 2, 31)
    cfg = build_config("tiny", {"data.batch_size": "4", "train.global_batch_size": "30"})
    assert global_batch(cfg, 2) == (32, 4, 4)  # 30 / 8 = 3.75 -> 4 per rank and step


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"data.tasks": "vqa,tvqa"}, "mixes image and video tasks"),
        ({"data.tasks": "vqa,okvqa"}, "unknown task(s) ['okvqa']"),
        ({"peft.method": "magic"}, "unknown PEFT method 'magic'; valid methods: single_adapter"),
        ({"model.arch": "gpt"}, "model.arch='gpt'; valid: t5, bart"),
        ({"train.precision": "fp16"}, "valid: auto, bf16, fp32"),
    ],
)
def test_validate_rejects_bad_runs(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(build_config("tiny", overrides))
    assert needle in str(e.value)
