"""Typed job configs: defaults < YAML < flags, flags made from the fields, clear errors for bad keys."""
from pathlib import Path

import pytest

from pipelines import config as cfglib
from pipelines.cli import build_parser, main
from pipelines.export import ExportConfig
from pipelines.generate import GenerateConfig
from pipelines.matte import MatteConfig

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def parsed(cls, argv: list[str]):
    """The config a command line resolves to, without running the command."""
    return cfglib.from_args(cls, build_parser().parse_args(argv))


def test_jobs_folder_has_specs():
    assert JOBS, "jobs/*.yaml: nothing to check"


@pytest.mark.parametrize("spec", JOBS, ids=lambda p: p.name)
def test_every_job_spec_loads_as_its_commands_config(spec):
    """`matting <command> --config jobs/<spec>.yaml` takes the spec's `config` as that command's typed config."""
    import yaml

    from pipelines.train import TrainConfig, resolve_recipe

    command = yaml.safe_load(spec.read_text())["command"]
    args = build_parser().parse_args([command, "--config", str(spec)])
    cfg = cfglib.from_args(args.config_class, args)
    assert isinstance(cfg, args.config_class) and cfglib.is_job_spec(yaml.safe_load(spec.read_text()))
    if isinstance(cfg, TrainConfig):  # its recipe keys resolve over the preset
        recipe = resolve_recipe(cfg.preset, cfg.recipe, cfg.steps, cfg.backbone_weights)
        assert recipe.steps == 20000 and recipe.augment.still == 0.3 and recipe.augment.size == (512, 288)


def test_every_command_has_a_job_spec():
    import yaml

    assert {yaml.safe_load(p.read_text())["command"] for p in JOBS} == {"generate", "train", "infer", "evaluate"}


def test_a_spec_of_another_command_is_refused(capsys):
    assert main(["train", "--config", str(REPO / "jobs" / "generate.yaml")]) == 2
    assert "a job spec for `matting generate`, not `matting train`" in capsys.readouterr().err


def test_a_spec_with_a_bad_config_key_is_refused_naming_it(tmp_path, capsys):
    f = tmp_path / "spec.yaml"
    f.write_text("command: generate\nconfig: {clips: 3, fakemotion: {wobble: 1}}\n")
    assert main(["generate", "--config", str(f)]) == 2
    assert "fakemotion.wobble: unknown key" in capsys.readouterr().err


def test_job_spec_values_reach_the_typed_config():
    cfg = parsed(GenerateConfig, ["generate", "--config", str(REPO / "jobs" / "generate.yaml")])
    assert cfg.clips == 20000 and cfg.fakemotion.size == (512, 288)
    assert cfg.photos == ("s3://matting-data/photos",)
    assert abs(cfg.fakemotion.motion.shift_probability - 1 / 3) < 1e-6


def test_flags_beat_the_file_and_the_file_beats_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("clips: 5\nseed: 3\nphotos: [a]\nfakemotion: {frames: 4, size: [64, 32]}\n")
    cfg = parsed(GenerateConfig, ["generate", "--config", str(f), "--size", "320x180", "--clips", "7",
                                  "--overwrite", "--photos", "p1", "--photos", "p2"])
    assert cfg.clips == 7 and cfg.fakemotion.size == (320, 180) and cfg.overwrite  # flags
    assert cfg.seed == 3 and cfg.fakemotion.frames == 4  # file
    assert cfg.workers == 2 and cfg.fakemotion.background_zoom == 1.15  # defaults
    assert cfg.photos == ("p1", "p2")  # a repeated flag replaces the file's list


def test_spellings_of_positionals_and_booleans():
    cfg = parsed(MatteConfig, ["matte", "clip.mp4", "-o", "out", "--model", "m.pt", "--formats", "pha,fgr",
                               "--no-amp", "--no-smooth-prior", "--alpha-bits", "16"])
    assert (cfg.video, cfg.out, cfg.formats, cfg.amp, cfg.smooth_prior, cfg.alpha_bits) == (
        "clip.mp4", "out", ("pha", "fgr"), False, False, 16)
    assert parsed(MatteConfig, ["matte"]).smooth_prior is None  # unset stays unset: the checkpoint decides
    cfg = parsed(ExportConfig, ["export", "--model", "m.pt", "--format", "onnx", "--no-verify", "out.onnx"])
    assert (cfg.out, cfg.format, cfg.verify) == ("out.onnx", "onnx", False)


@pytest.mark.parametrize("yaml_text, key", [
    ("clipz: 5\n", "clipz"),
    ("fakemotion:\n  motion:\n    bogus: 1\n", "fakemotion.motion.bogus"),
    ("clips: abc\n", "clips"),
    ("clips: '5'\n", "clips"),  # strict: a quoted number is a string
    ("out: 7\n", "out"),
    ("photos: s3://one\n", "photos"),  # a list, not a string
    ("fakemotion: {size: [1, 2, 3]}\n", "fakemotion.size"),
    ("overwrite: maybe\n", "overwrite"),
])
def test_bad_yaml_is_refused_naming_the_key(tmp_path, yaml_text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(cfglib.ConfigError, match=rf"(^|; ){key}\b"):
        cfglib.load(GenerateConfig, f)


def test_cli_refuses_bad_config_with_usage_status(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("fakemotion:\n  motion:\n    wobble: 1\n")
    assert main(["generate", "--config", str(f)]) == 2
    assert "fakemotion.motion.wobble: unknown key" in capsys.readouterr().err
    assert main(["generate", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err
    assert main(["generate", "--clips", "many"]) == 2
    assert "--clips" in capsys.readouterr().err
    assert main(["generate", "--size", "wide"]) == 2
    assert "--size" in capsys.readouterr().err


@pytest.mark.s3
def test_config_file_from_object_storage(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.pipe("test/configs/gen.yaml", b"clips: 11\nfakemotion: {frames: 3}\n")
    cfg = parsed(GenerateConfig, ["generate", "--config", "s3://test/configs/gen.yaml", "--seed", "4"])
    assert (cfg.clips, cfg.fakemotion.frames, cfg.seed) == (11, 3, 4)


def test_help_shows_defaults_from_the_dataclass_and_the_examples(capsys):
    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "--size WxH" in out and "(default: 512x288)" in out and "(default: 100)" in out
    assert "matting generate --config jobs/generate.yaml" in out  # the examples
    assert main(["matte", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "-o OUT, --out OUT" in out and "--no-amp" in out and "(default: pha,fgr,rgba.webm)" in out


def test_dict_round_trip_gives_the_same_config():
    cfg = parsed(GenerateConfig, ["generate", "--size", "96x64", "--photos", "p"])
    assert cfglib.from_dict(GenerateConfig, cfglib.to_dict(cfg)) == cfg
