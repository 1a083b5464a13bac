"""The arms and the run folder travel from the generation module's configuration to the data
module as parse-time links of the CLI (``pipeline/cli.py:link_generation``), never as attribute
writes after instantiation: checked in the parsed configuration before any class is built, and
end to end with arms named other than the shipped ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_utils import MAIN_CONFIG, REPO, records, run_in_process

TINY = ["--data.init_args.samples_per_prompt", "3", "--data.init_args.batch_size", "4",
        "--model.init_args.num_steps", "3", "--trainer.accelerator", "cpu"]


class _Parsed(Exception):
    """Raised in place of instantiation: carries the CLI as parsing left it."""

    def __init__(self, cli) -> None:
        super().__init__("parsed")
        self.cli = cli


def parse_only(monkeypatch, args: list[str], run: bool = True):
    """The configuration the CLI parsed (links applied, ``before_instantiate_classes`` done),
    with no class instantiated."""
    from ntrk_lightning.pipeline.cli import NTRKCLI, build_cli

    def stop(self) -> None:
        raise _Parsed(self)

    monkeypatch.setattr(NTRKCLI, "instantiate_classes", stop)
    with pytest.raises(_Parsed) as caught:
        build_cli(args, run=run)
    cli = caught.value.cli
    return cli.config[cli.subcommand] if cli.subcommand else cli.config


def config_with_arms(tmp_path: Path, arms: dict[str, dict], data_extra: dict | None = None) -> Path:
    """The main job's config with its ``samplers`` replaced by ``arms`` (name -> sampler spec)."""
    cfg = yaml.safe_load(MAIN_CONFIG.read_text())
    cfg["model"]["init_args"]["samplers"] = arms
    cfg["data"]["init_args"].update(data_extra or {})
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


PLAIN = {"class_path": "ntrk_lightning.samplers.Plain"}
NTRK = {"class_path": "ntrk_lightning.samplers.NTRK", "init_args": {"rho": 0.01}}


def test_arms_are_the_sampler_names_in_the_parsed_config(tmp_path, monkeypatch):
    # "b" before "a": the arms keep the samplers' order (a sorted or fixed list would fail)
    cfg_file = config_with_arms(tmp_path, {"b": NTRK, "a": PLAIN})
    cfg = parse_only(monkeypatch, ["predict", "-c", str(cfg_file), "--output_dir", str(tmp_path / "o")])
    assert cfg.data.init_args.arms == ["b", "a"]
    assert list(cfg.model.init_args.samplers) == ["b", "a"]


@pytest.mark.parametrize("given,expected", [
    (["--output_dir", "TOP"], "TOP"),
    (["--model.init_args.output_dir", "OWN"], "OWN"),
    (["--model.init_args.output_dir", "OWN", "--output_dir", "TOP"], "TOP"),  # --output_dir wins
    (["--output_dir", "TOP", "--model.init_args.output_dir", "OWN"], "TOP"),  # whatever the order
])
def test_run_folder_reaches_module_data_and_trainer_at_parse_time(tmp_path, monkeypatch, given, expected):
    args = [a.replace("TOP", str(tmp_path / "top")).replace("OWN", str(tmp_path / "own")) for a in given]
    want = str(tmp_path / ("top" if expected == "TOP" else "own"))
    cfg = parse_only(monkeypatch, ["predict", "-c", str(MAIN_CONFIG), *args])
    assert cfg.data.init_args.output_dir == want
    assert cfg.model.init_args.output_dir == want
    assert cfg.trainer.default_root_dir == want
    assert cfg.output_dir == want  # kept by the saved config.yaml, which drops the link targets
    assert cfg.return_predictions is False  # the writer saves every batch; nothing kept in memory


def test_links_also_apply_without_a_subcommand(tmp_path, monkeypatch):
    """``build_cli(..., run=False)`` (a predict config built in Python) links the same way."""
    out = str(tmp_path / "own")
    cfg_file = config_with_arms(tmp_path, {"x": PLAIN, "y": PLAIN})
    cfg = parse_only(monkeypatch, ["-c", str(cfg_file), "--model.init_args.output_dir", out], run=False)
    assert cfg.data.init_args.arms == ["x", "y"] and cfg.data.init_args.output_dir == out


def test_built_data_module_gets_the_linked_values_as_init_args(tmp_path, monkeypatch):
    """The data module is constructed with them: no attribute is written after construction."""
    from ntrk_lightning.pipeline import PromptDataModule
    from ntrk_lightning.pipeline.cli import build_cli

    seen = {}
    original = PromptDataModule.__init__

    def recording(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PromptDataModule, "__init__", recording)
    out = str(tmp_path / "o")
    cli = build_cli(["-c", str(config_with_arms(tmp_path, {"a": PLAIN, "b": PLAIN})),
                     "--model.init_args.output_dir", out], run=False)
    assert seen["arms"] == ["a", "b"] and seen["output_dir"] == out
    assert cli.datamodule.arms == ["a", "b"] and cli.datamodule.output_dir == out
    assert callable(cli.datamodule.fingerprint)  # the one hand-over left: a function of the built model


@pytest.mark.parametrize("where", ["config", "flag"])
def test_arms_set_by_the_user_are_one_line_error(tmp_path, capsys, where):
    from ntrk_lightning.cli import main

    arms = {"a": PLAIN, "b": PLAIN}
    if where == "config":
        args = ["-c", str(config_with_arms(tmp_path, arms, {"arms": ["a", "c"]}))]
    else:
        args = ["-c", str(config_with_arms(tmp_path, arms)), "--data.init_args.arms", "[c]"]
    with pytest.raises(SystemExit) as exc:
        main(["predict", *args, "--output_dir", str(tmp_path / "o")])
    text = f"{exc.value.code or ''}{capsys.readouterr().err}".strip()
    assert exc.value.code not in (0, None)
    assert len(text.splitlines()) == 1, text
    assert "data.init_args.arms" in text and "model.init_args.samplers" in text and "['a', 'b']" in text
    assert "Namespace" not in text and "compute_fn" not in text  # the reason, not jsonargparse's dump
    assert not (tmp_path / "o").exists()


def test_a_data_module_without_arms_is_left_alone(tmp_path, monkeypatch):
    cfg = parse_only(monkeypatch, ["predict", "-c", str(MAIN_CONFIG), "--output_dir", str(tmp_path / "o"),
                                   "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"])
    assert cfg.data.class_path.endswith("BoringDataModule")
    assert "arms" not in (cfg.data.get("init_args") or {})


def _samplers(path: Path):
    return (yaml.safe_load(path.read_text()).get("model", {}).get("init_args") or {}).get("samplers")


PREDICT_CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if _samplers(p) is not None]


def test_every_shipped_predict_config_is_checked():
    assert len(PREDICT_CONFIGS) >= 10 and (REPO / "configs" / "digits_ntrk.yaml") in PREDICT_CONFIGS


@pytest.mark.parametrize("path", PREDICT_CONFIGS, ids=lambda p: p.stem)
def test_shipped_predict_configs_leave_arms_to_the_link(path, tmp_path, monkeypatch):
    raw = yaml.safe_load(path.read_text())
    samplers = _samplers(path)
    assert "arms" not in (raw.get("data", {}).get("init_args") or {})
    monkeypatch.chdir(REPO)  # prompt files are relative to the repository
    cfg = parse_only(monkeypatch, ["predict", "-c", str(path), "--output_dir", str(tmp_path / "o")])
    assert cfg.data.init_args.arms == list(samplers)
    assert cfg.data.init_args.output_dir == str(tmp_path / "o")


@pytest.mark.slow
def test_renamed_arms_end_to_end_and_rerun_from_the_saved_config(tmp_path):
    """A predict run with arms named ``a``/``b`` and the run folder given as the module's own
    option writes the arms under images/<arm>/, and the saved config.yaml (the linked values left
    out) reruns the same run without regenerating."""
    out = tmp_path / "run"
    cfg_file = config_with_arms(tmp_path, {"a": NTRK, "b": PLAIN})
    run_in_process(["predict", "-c", str(cfg_file), "--model.init_args.output_dir", str(out), *TINY,
                    "--model.init_args.report", "false"])
    images = out / "images"
    assert sorted(p.name for p in images.iterdir()) == ["a", "b"]
    for arm in ("a", "b"):
        assert len(list((images / arm).rglob("*.png"))) == 3
    recs = records(out)
    assert sorted(r["arm"] for r in recs) == ["a"] * 3 + ["b"] * 3
    assert all(r["grad_evals"] > 0 for r in recs if r["arm"] == "a")  # "a" is the NTRK arm
    assert all(r["grad_evals"] == 0 for r in recs if r["arm"] == "b")

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert "arms" not in (saved["data"].get("init_args") or {})
    stamps = {p: p.stat().st_mtime_ns for p in images.rglob("*.png")}
    run_in_process(["predict", "-c", str(out / "config.yaml")])
    assert {p: p.stat().st_mtime_ns for p in images.rglob("*.png")} == stamps
