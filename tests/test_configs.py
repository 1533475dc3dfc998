"""The recipes in configs/ load through the command line's own path (``--config FILE``) and pass its checks."""

import json
from pathlib import Path

import pytest

from segadapt.adapt.config import UDA_LR, AdaptConfig, SourceTrainConfig, check_config, to_dict
from segadapt.cli import build_parser, main
from segadapt.cli_args import config_from_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
#: the command (and so the config dataclass) each recipe is for
COMMAND = {"quick-source-free": ("adapt", AdaptConfig), "uda": ("adapt", AdaptConfig),
           "kitti-wide": ("adapt", AdaptConfig), "quick-source": ("train-source", SourceTrainConfig)}


def _load(path: Path, *flags: str):
    """The resolved config of ``segadapt <command> --config path flags...``, as the command builds it."""
    command, cls = COMMAND[path.stem]
    ns = build_parser(command).parse_args([command, "--config", str(path), *flags])
    return config_from_cli(cls, ns, ns.config)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_recipe_has_a_command():
    assert CONFIGS and {p.stem for p in CONFIGS} == set(COMMAND)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads_into_its_config_and_passes_the_checks(path):
    cfg = _load(path)
    assert isinstance(cfg, COMMAND[path.stem][1])
    check_config(cfg)
    resolved = _flat(to_dict(cfg))
    for key, value in _flat(json.loads(path.read_text())).items():
        assert resolved[key] == (list(value) if isinstance(value, tuple) else value), key
    # the flags a user adds still override the file
    assert _load(path, "--steps", "7").steps == 7


def test_recipes_hold_the_measured_settings():
    by = {p.stem: _load(p) for p in CONFIGS if COMMAND[p.stem][0] == "adapt"}
    for cfg in by.values():  # the 150-step schedule of the measured tables
        assert (cfg.steps, cfg.batch_size, cfg.teacher.alpha) == (150, 4, 0.99)
    uda = _load(next(p for p in CONFIGS if p.stem == "uda"), "--source-data", "SRC")
    assert uda.lr == 6e-5 == UDA_LR and uda.learning_rate() == UDA_LR and uda.source_data == "SRC"
    assert by["kitti-wide"].keep_aspect == 180 and by["kitti-wide"].size == (0, 0)
    assert by["quick-source-free"].source_data == "" and by["quick-source-free"].lr == 0.0  # the mode's default


def test_a_recipe_with_a_broken_key_is_refused(tmp_path, capsys):
    d = json.loads(next(p for p in CONFIGS if p.stem == "uda").read_text())
    d["teacher"]["alpah"] = d["teacher"].pop("alpha")
    broken = tmp_path / "uda.json"
    broken.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="alpah"):
        _load(broken)
    assert main(["adapt", "--config", str(broken), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "alpah" in err and "alpha" in err


def test_the_source_recipe_is_the_main_jobs(tmp_path, monkeypatch):
    """configs/quick-source.json trains the source model the quick preset trains (every setting but the paths)."""
    import segadapt.adapt.train_source as ts
    from segadapt.pipeline import PipelineConfig, _PipelineRun

    seen = {}
    monkeypatch.setattr(ts, "train_source", lambda cfg, log=None: seen.setdefault("cfg", cfg) and {"steps": 0})
    _PipelineRun(PipelineConfig(data=str(tmp_path / "d"), out=str(tmp_path / "r"), device="auto"),
                 log=lambda *_: None).step_train_source()
    recipe = _load(next(p for p in CONFIGS if p.stem == "quick-source"), "--data", str(tmp_path / "d"), "--out",
                   str(tmp_path / "r" / "source"))
    main_job = to_dict(seen["cfg"])
    differ = {k: (v, main_job[k]) for k, v in to_dict(recipe).items() if main_job[k] != v and k != "resume"}
    assert not differ, differ
    assert recipe.rare_class_sampling and recipe.loss == "balanced" and recipe.size == (144, 192)
