"""Shipped configs by name (``ntrk predict -c digits_ntrk``), ``ntrk configs`` (list, ``--copy``),
prompt lists resolved from any directory, and ``ntrk samplers`` read from the specs themselves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline_utils import REPO


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    from ntrk_lightning import builtin_configs as bc

    monkeypatch.chdir(tmp_path)
    assert bc.resolve("digits_ntrk").read_bytes() == (REPO / "configs" / "digits_ntrk.yaml").read_bytes()
    assert bc.resolve("digits_ntrk.yaml") == bc.resolve("digits_ntrk")
    assert bc.is_config_name("digits_ntrk")
    assert not bc.is_config_name("configs/digits_ntrk.yaml")  # a path is a path
    (tmp_path / "digits_ntrk").write_text("model: {}\n")
    assert not bc.is_config_name("digits_ntrk")  # an existing file wins over the shipped name
    with pytest.raises(bc.ConfigError, match=r"no config file or built-in config named 'nope'.*digits_ntrk"):
        bc.resolve("nope")


def test_every_shipped_yaml_is_listed_with_its_leading_comment():
    from ntrk_lightning import builtin_configs as bc

    listed = {c.name: c for c in bc.list_configs()}
    on_disk = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(listed) == on_disk
    for name, c in listed.items():
        first = (REPO / "configs" / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        assert c.summary[:30] == first[:30], name  # the summary starts with the file's first comment line
    assert listed["digits_ntrk"].subcommand == "predict" and listed["digits_unet_fit"].subcommand == "fit"


def test_prompt_lists_resolve_from_any_directory(tmp_path, monkeypatch):
    from ntrk_lightning import builtin_configs as bc

    cfg = bc.resolve("sd15_aesthetic_ntrk")
    flag, path = bc.data_path_overrides(cfg, cwd=tmp_path)
    assert flag == "--data.init_args.prompts_file"
    assert Path(path).read_bytes() == (REPO / "configs" / "prompts" / "animals45.txt").read_bytes()
    # from the repository root (or a user's own configs/prompts/...) the file given is kept
    assert bc.data_path_overrides(cfg, cwd=REPO) == []
    (tmp_path / "configs" / "prompts").mkdir(parents=True)
    (tmp_path / "configs" / "prompts" / "animals45.txt").write_text("my prompt\n")
    assert bc.data_path_overrides(cfg, cwd=tmp_path) == []
    assert bc.data_path_overrides(bc.resolve("digits_ntrk"), cwd=tmp_path) == []  # no data files


def test_cli_replaces_config_names_and_keeps_later_flags_last(tmp_path, monkeypatch):
    from ntrk_lightning import builtin_configs as bc
    from ntrk_lightning.cli import resolve_config_args

    monkeypatch.chdir(tmp_path)
    args = resolve_config_args(["-c", "sd15_aesthetic_ntrk", "--data.init_args.prompts_file", "mine.txt"])
    assert args[:2] == ["--config", str(bc.resolve("sd15_aesthetic_ntrk"))]
    assert args[2] == "--data.init_args.prompts_file" and args[-2:] == ["--data.init_args.prompts_file", "mine.txt"]
    assert resolve_config_args(["--config=digits_ntrk"]) == ["--config", str(bc.resolve("digits_ntrk"))]
    own = tmp_path / "own.yaml"
    own.write_text("seed_everything: 1\n")
    assert resolve_config_args(["-c", str(own), "--x", "1"]) == ["--config", str(own), "--x", "1"]


def test_unknown_config_name_is_one_line_error(tmp_path, monkeypatch, capsys):
    from ntrk_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["predict", "-c", "digits_ntrkk", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "digits_ntrkk" in err and "ntrk configs" in err


def test_configs_copy_writes_once_and_never_overwrites(tmp_path, capsys):
    from ntrk_lightning.cli import main

    dest = tmp_path / "mine"
    assert main(["configs", "--copy", "digits_baselines", str(dest)]) == 0
    copied = dest / "digits_baselines.yaml"
    assert copied.read_bytes() == (REPO / "configs" / "digits_baselines.yaml").read_bytes()
    assert "ntrk predict -c" in capsys.readouterr().out
    copied.write_text("# edited\n")
    assert main(["configs", "--copy", "digits_baselines", str(dest)]) == 2
    assert "not overwriting" in capsys.readouterr().err
    assert copied.read_text() == "# edited\n"
    assert sorted(os.listdir(dest)) == ["digits_baselines.yaml"]  # no temporary file left behind
    assert main(["configs", "--copy", "nope", str(dest)]) == 2


def test_configs_lists_every_name(capsys):
    from ntrk_lightning import builtin_configs as bc
    from ntrk_lightning.cli import main

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for c in bc.list_configs():
        assert any(line.split()[:2] == [c.name, c.subcommand] for line in out.splitlines()), c.name


def test_samplers_command_reads_the_registered_specs(capsys, monkeypatch):
    from ntrk_lightning import samplers as S
    from ntrk_lightning.cli import main
    from ntrk_lightning.samplers.plain import Plain

    @dataclasses.dataclass
    class Toy(Plain):
        """A toy sampler for this test.

        Args:
            width: how wide, in toy units.
        """

        width: int = 7
        name: ClassVar[str] = "toy_for_test"
        nfe_formula: ClassVar[str] = "3 S + 1"
        source: ClassVar[str] = "nobody 2026"

    monkeypatch.setitem(S.REGISTRY, Toy.name, Toy)
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split()[0]: b for b in out.split("\n\n") if b.strip() and not b.startswith("Registered")}
    assert set(blocks) == set(S.REGISTRY)
    for name, cls in S.REGISTRY.items():
        for f in dataclasses.fields(cls):
            assert f"    {f.name}: " in blocks[name], (name, f.name)
        assert f"NFE per sample: {getattr(cls, 'nfe_formula', '?')}" in blocks[name]
    toy = blocks["toy_for_test"]
    assert "A toy sampler for this test." in toy and "3 S + 1" in toy and "nobody 2026" in toy
    assert "    width: int = 7  -- how wide, in toy units." in toy
    assert "    eta: float = 1.0" in toy  # inherited option
