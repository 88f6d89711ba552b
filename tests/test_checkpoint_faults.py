"""Hostile checkpoints and output paths (issue 11): one ``error:`` line, exit 2, nothing written.

A checkpoint with NaN/Inf weights, one whose config names an unknown architecture, and one whose
shapes do not fit the architecture it names are refused the same way by training, feature
extraction and the soup (``solution.models``: ``resolve_config``, ``load_weights``, ``check_shapes``,
``check_finite``). Soup and compare refuse outputs that are folders, sit under files or are inputs;
compare refuses malformed inputs; a full disk (a real small tmpfs) leaves the previous files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest
import torch
from train_helpers import make_data, tiny_argv

from solution import compare, features, soup, train
from solution.common import SolutionError, run_cli, write_json, write_jsonl
from solution.model import ModelConfig, build_model, load_model, save_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A good tiny checkpoint, a second one, the state dict and config they hold, texts and data."""
    root = tmp_path_factory.mktemp("faults")
    cfg = ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16)
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    save_checkpoint(root / "good.pt", sd, cfg)
    save_checkpoint(root / "other.pt", {k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, cfg)
    (root / "texts.jsonl").write_text('{"text_id": 1, "text": "红色"}\n', encoding="utf-8")
    train_split, _ = make_data(root / "data", per_colour_train=1, per_colour_valid=1, colours=4)
    return root, cfg, sd, train_split


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _error_line(capsys, main, argv) -> str:
    capsys.readouterr()
    assert run_cli(main, [str(a) for a in argv]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- bad checkpoints


def _bad_checkpoint(kind: str, path, cfg: ModelConfig, sd: dict) -> str:
    """Write a hostile checkpoint; return what its error line must name."""
    sd = dict(sd)
    if kind in ("nan", "inf"):
        for name in ("visual.proj", "bert.encoder.layer.1.output.dense.weight"):
            sd[name] = sd[name].clone()
            sd[name][0, 0] = float("nan") if kind == "nan" else float("-inf")
        save_checkpoint(path, sd, cfg)
        return "non-finite weights (NaN or Inf) in 2 tensors: visual.proj, bert.encoder.layer.1.output.dense.weight"
    if kind == "unknown_arch":  # weights that fit, a name nothing knows: it would be mislabelled
        config = {**cfg.to_dict(), "vision_model": "ViT-Nope"}
        torch.save(
            {"epoch": 1, "step": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "config": config}, path
        )
        return "unknown vision architecture 'ViT-Nope'"
    if kind == "other_shape":  # a wider vision tower under the config of the tiny one
        wide = dataclasses.replace(cfg, model_info={**cfg.model_info, "vision_width": 128})
        save_checkpoint(path, build_model(wide).state_dict(), cfg)
        return "not ViT-Tiny@RBT-Tiny: 32 tensors differ in shape (visual.class_embedding 128 vs 64"
    if kind == "bad_grid":  # 50 image positions: no square grid (upstream's resize raised a RuntimeError)
        sd["visual.positional_embedding"] = torch.zeros(51, 64)
        save_checkpoint(path, sd, cfg)
        return "1 tensor differs in shape (visual.positional_embedding 51x64 vs 65x64)"
    raise AssertionError(kind)


KINDS = ["nan", "inf", "unknown_arch", "other_shape", "bad_grid"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("consumer", ["features", "train", "soup"])
def test_bad_checkpoint_is_one_line_in_every_consumer(tiny, tmp_path, capsys, kind, consumer):
    root, cfg, sd, train_split = tiny
    bad = tmp_path / "bad.pt"
    expect = _bad_checkpoint(kind, bad, cfg, sd)
    before = _digest(bad)
    if consumer == "features":
        out = tmp_path / "txt.npy"
        line = _error_line(
            capsys,
            features.main,
            [
                "--resume",
                bad,
                "--extract-text-feats",
                "--text-data",
                root / "texts.jsonl",
                "--text-feat-output-path",
                out,
                "--device",
                "cpu",
                "--no-progress",
            ],
        )
        assert not out.exists() and not list(tmp_path.glob("txt*"))
    elif consumer == "train":
        argv = tiny_argv(train_split, None, tmp_path / "logs", resume=bad, max_epochs=1, batch_size=2)
        if kind == "unknown_arch":  # the names come from the checkpoint, not from flags
            for flag in ("--vision-model", "--text-model"):
                i = argv.index(flag)
                del argv[i : i + 2]
        line = _error_line(capsys, train.main, argv)
        assert not list((tmp_path / "logs").rglob("*.pt"))
    else:
        out = tmp_path / "soup"
        line = _error_line(
            capsys,
            soup.main,
            ["--checkpoints", root / "good.pt", bad, "--method", "uniform", "--no-score", "--output", out],
        )
        assert not out.exists()
    assert str(bad) in line and expect in line, line
    assert _digest(bad) == before  # the input is untouched


def test_registry_name_with_another_model_info_loads_as_stored_with_a_warning(tiny, tmp_path, caplog):
    """A config naming a known architecture but recording other sizes: built as recorded, and said."""
    _, cfg, _, _ = tiny
    wide = dataclasses.replace(cfg, model_info={**cfg.model_info, "vision_width": 128})
    save_checkpoint(tmp_path / "w.pt", build_model(wide).state_dict(), wide)
    model, config, _ = load_model(tmp_path / "w.pt")
    assert config.model_info["vision_width"] == 128 and model.visual.proj.shape == (128, 64)
    assert "differs from the registry's in vision_width (128, registry 64)" in caplog.text


def test_config_that_is_not_a_mapping_or_lacks_sizes_is_refused(tiny, tmp_path):
    _, cfg, sd, _ = tiny
    module_sd = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"state_dict": module_sd, "config": "ViT-Tiny"}, tmp_path / "s.pt")
    with pytest.raises(SolutionError, match=r"s\.pt: its 'config' is a str, not a mapping"):
        load_model(tmp_path / "s.pt")
    info = {k: v for k, v in cfg.model_info.items() if k != "vision_width"}
    torch.save({"state_dict": module_sd, "config": {**cfg.to_dict(), "model_info": info}}, tmp_path / "m.pt")
    with pytest.raises(SolutionError, match=r"m\.pt: its config's model_info lacks vision_width"):
        load_model(tmp_path / "m.pt")
    torch.save({"state_dict": module_sd, "config": {**cfg.to_dict(), "text_model": "ViT-Tiny"}}, tmp_path / "k.pt")
    with pytest.raises(
        SolutionError,
        match=r"k\.pt: its config names 'ViT-Tiny' as the text architecture, but it is not a text model config",
    ):
        load_model(tmp_path / "k.pt")


def test_resizable_position_grid_still_loads(tiny, tmp_path):
    """A 7x7 grid (another image resolution) is resized as upstream does, not refused."""
    _, cfg, sd, _ = tiny
    save_checkpoint(tmp_path / "g.pt", {**sd, "visual.positional_embedding": torch.zeros(50, 64)}, cfg)
    model, _, _ = load_model(tmp_path / "g.pt")
    assert model.visual.positional_embedding.shape == (65, 64)


# ---------------------------------------------------------------- soup outputs


def test_soup_output_that_cannot_be_written_is_refused_before_any_work(tiny, tmp_path, capsys):
    root, _, _, _ = tiny
    good, other = root / "good.pt", root / "other.pt"
    sums = {p: _digest(p) for p in (good, other)}
    run = ["--method", "uniform", "--no-score", "--checkpoints", good, other]
    # the output is an ingredient (a file)
    assert "is a file, expected a folder" in _error_line(capsys, soup.main, [*run, "--output", good])
    # the output sits under a file
    assert "sits under" in _error_line(capsys, soup.main, [*run, "--output", good / "soup"])
    # the soup.pt it would write is one of the ingredients (named, not globbed: before, it was silently replaced)
    out = tmp_path / "s"
    out.mkdir()
    save_checkpoint(
        out / "soup.pt",
        torch.load(other, weights_only=True)["state_dict"],
        ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=16),
    )
    kept = _digest(out / "soup.pt")
    line = _error_line(
        capsys,
        soup.main,
        ["--method", "uniform", "--no-score", "--checkpoints", good, out / "soup.pt", "--output", out],
    )
    assert "is one of the inputs" in line and "soup.pt" in line and _digest(out / "soup.pt") == kept
    # its soup.pt (or a method's folder) is a folder
    out2 = tmp_path / "s2"
    (out2 / "soup.pt").mkdir(parents=True)
    assert "soup.pt is a folder" in _error_line(capsys, soup.main, [*run, "--output", out2])
    assert sorted(p.name for p in out2.iterdir()) == ["soup.pt"]  # no log, cache or summary written
    out3 = tmp_path / "s3"
    out3.mkdir()
    (out3 / "greedy").write_text("a file")
    line = _error_line(
        capsys,
        soup.main,
        [
            "--method",
            "uniform,greedy",
            "--val-data",
            tmp_path / "nowhere",
            "--checkpoints",
            good,
            other,
            "--output",
            out3,
        ],
    )
    assert "greedy" in line and "is a file, expected a folder" in line
    assert sorted(p.name for p in out3.iterdir()) == ["greedy"]
    assert all(_digest(p) == s for p, s in sums.items())


def test_soup_glob_matching_only_its_own_output_is_one_line(tiny, tmp_path, capsys):
    root, _, _, _ = tiny
    out = tmp_path / "s"
    assert (
        run_cli(
            soup.main,
            [
                "--checkpoints",
                str(root / "good.pt"),
                str(root / "other.pt"),
                "--method",
                "uniform",
                "--no-score",
                "--output",
                str(out),
            ],
        )
        == 0
    )
    line = _error_line(
        capsys, soup.main, ["--checkpoints", str(out / "*.pt"), "--method", "uniform", "--no-score", "--output", out]
    )
    assert "every checkpoint matched lies inside the output folder" in line


def test_soup_from_study_with_a_malformed_trials_csv(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "trials.csv").write_text(
        'number,state,value,run_dir\n0,COMPLETE,"35.0,x\n1,COMPLETE,30,y\n', encoding="utf-8"
    )
    line = _error_line(
        capsys, soup.main, ["--from-study", study, "--method", "uniform", "--no-score", "--output", tmp_path / "out"]
    )
    assert "trials.csv:2: malformed CSV" in line
    (study / "trials.csv").write_text("number,state,value,run_dir\n0,COMPLETE,high,x\n", encoding="utf-8")
    assert "number and value must be numbers" in _error_line(
        capsys, soup.main, ["--from-study", study, "--method", "uniform", "--no-score", "--output", tmp_path / "out"]
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- compare


@pytest.fixture
def runs(tmp_path):
    run = tmp_path / "logs" / "a"
    write_jsonl(
        run / "metrics.jsonl",
        [{"step": 10, "kind": "valid", "set": "valid", "r1": 1.0, "r5": 2.0, "r10": 3.0, "mean_recall": 2.0}],
    )
    write_json(run / "params.json", {"lr": 1e-5})
    return run


@pytest.mark.parametrize(
    "flag,target,expect",
    [
        ("--output", "metrics.jsonl", "is one of the inputs"),
        ("--plot", "metrics.jsonl", "is one of the inputs"),
        ("--output", "params.json", "is one of the inputs"),
        ("--plot", "params.json", "is one of the inputs"),
        ("--output", "", "is a folder, expected a file path"),
        ("--plot", "", "is a folder, expected a file path"),
        ("--output", "params.json/x.md", "sits under"),
        ("--plot", "params.json/x.png", "sits under"),
    ],
)
def test_compare_outputs_that_are_inputs_folders_or_under_files(runs, tmp_path, capsys, flag, target, expect):
    inputs = {p: _digest(p) for p in runs.iterdir()}
    other = ["--plot", tmp_path / "c.png"] if flag == "--output" else ["--output", tmp_path / "c.md"]
    line = _error_line(capsys, compare.main, [runs, flag, runs / target if target else runs, *other])
    assert expect in line and flag in line
    assert {p: _digest(p) for p in runs.iterdir() if p.is_file()} == inputs
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "c.md").exists()  # nothing written
    assert not list(runs.glob(".*.tmp"))


def test_compare_plot_and_output_on_one_path_is_refused(runs, tmp_path, capsys):
    line = _error_line(capsys, compare.main, [runs, "--output", tmp_path / "x", "--plot", tmp_path / "x"])
    assert "--plot" in line and "is one of the inputs" in line and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "case",
    ["metrics_bytes", "soup_log_bytes", "trials_bytes", "trials_quote", "trials_extra_field", "metrics_not_object"],
)
def test_compare_malformed_inputs_are_one_line_naming_file_and_line(tmp_path, capsys, case):
    d = tmp_path / "x"
    d.mkdir()
    if case.startswith("metrics"):
        f = d / "metrics.jsonl"
        f.write_bytes(
            b'{"kind": "train", "step": 1}\n'
            + (b'{"kind": "valid", "text": "\xff\xfe"}\n' if case == "metrics_bytes" else b"[1, 2]\n")
        )
        expect = "metrics.jsonl:2: not UTF-8" if case == "metrics_bytes" else "record 2 is a list, not a JSON object"
    elif case == "soup_log_bytes":
        f = d / "soup_log.jsonl"
        f.write_bytes(b'{"method": "greedy", "round": 0, "mean_recall": 1.0, "kept": true}\n\xc3\x28\n')
        expect = "soup_log.jsonl:2: not UTF-8"
    else:
        f = d / "trials.csv"
        body = {
            "trials_bytes": b"0,COMPLETE,1.0,r\n1,COMPLETE,2.0,\xe9t\xe9\n",
            "trials_quote": b'0,COMPLETE,1.0,"r\n1,COMPLETE,2.0,s\n2,COMPLETE,3.0,t\n',
            "trials_extra_field": b"0,COMPLETE,1.0,r,extra\n",
        }[case]
        f.write_bytes(b"number,state,value,run_dir\n" + body)
        expect = {
            "trials_bytes": "trials.csv:3: not UTF-8",
            "trials_quote": "trials.csv:2: malformed CSV",
            "trials_extra_field": "trials.csv:2: more fields than the header",
        }[case]
    before = _digest(f)
    line = _error_line(capsys, compare.main, [d, "--output", tmp_path / "c.md", "--plot", tmp_path / "c.png"])
    assert expect in line and str(f) in line, line
    assert _digest(f) == before and not (tmp_path / "c.md").exists() and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("content", [b'{"lr": "\xff"}\n', b"[1, 2]\n"])
def test_compare_unreadable_params_or_summary_warns_and_goes_on(runs, tmp_path, caplog, content):
    (runs / "params.json").write_bytes(content)
    s = tmp_path / "soup"
    write_jsonl(
        s / "soup_log.jsonl", [{"method": "uniform", "round": 1, "members": ["a"], "mean_recall": 3.0, "kept": True}]
    )
    (s / "summary.json").write_bytes(content)
    text = compare.main([str(runs), str(s), "--no-plot", "--csv"])
    assert "soup,3.0" in text.replace('"', "") and "params.json" in caplog.text and "summary.json" in caplog.text


# ---------------------------------------------------------------- full disk (a real small tmpfs)


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_file(tiny, small_disk):
    _, cfg, sd, _ = tiny
    disk = small_disk(8)  # one tiny checkpoint (6 MB) fits, a second one beside it does not
    path = disk / "ckpt.pt"
    save_checkpoint(path, sd, cfg, epoch=1)
    before = _digest(path)
    with pytest.raises(SolutionError, match=f"disk full at {path}"):
        save_checkpoint(path, sd, cfg, epoch=2)
    assert _digest(path) == before and torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in disk.iterdir()) == ["ckpt.pt"]  # no temp file left


def test_soup_on_a_full_disk_keeps_the_previous_soup(tiny, small_disk, capsys):
    root, _, _, _ = tiny
    disk = small_disk(10)  # the first soup (6 MB + logs) fits; a second soup.pt beside it does not
    out = disk / "soup"
    run = ["--method", "uniform", "--no-score", "--output", str(out), "--checkpoints"]
    assert run_cli(soup.main, [*run, str(root / "good.pt"), str(root / "other.pt")]) == 0
    kept = {name: _digest(out / name) for name in ("soup.pt", "summary.json")}
    line = _error_line(capsys, soup.main, [*run, str(root / "good.pt")])
    assert f"disk full at {out / 'soup.pt'}" in line
    assert {name: _digest(out / name) for name in kept} == kept  # the previous soup and its summary survive
    assert not list(out.glob(".*.tmp"))
    recipe = torch.load(out / "soup.pt", weights_only=True)["recipe"]
    assert json.loads((out / "summary.json").read_text())["soups"]["uniform"]["members"] == recipe["members"]


# ---------------------------------------------------------------- memory: mapped, then let go


def _mapped(path) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return any(str(path) in line for line in f)


def test_read_checkpoint_maps_a_zip_file_and_reads_a_legacy_one_whole(tiny, tmp_path, monkeypatch):
    root, cfg, sd, _ = tiny
    calls, real = [], torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    from solution.model import read_checkpoint

    ckpt = read_checkpoint(root / "good.pt")
    assert calls[-1]["mmap"] is True and calls[-1]["weights_only"] is True and calls[-1]["map_location"] == "cpu"
    if os.path.exists("/proc/self/maps"):
        assert _mapped((root / "good.pt").resolve())  # file-backed pages, not a copy in the process
    key = "module.logit_scale"
    assert torch.equal(ckpt["state_dict"][key], sd["logit_scale"])
    before = _digest(root / "good.pt")
    ckpt["state_dict"][key].add_(1.0)  # a private mapping: the file never changes
    del ckpt
    assert _digest(root / "good.pt") == before

    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, legacy, _use_new_zipfile_serialization=False)
    got = read_checkpoint(legacy)
    assert calls[-1]["mmap"] is False
    assert all(torch.equal(got["state_dict"][f"module.{k}"], v) for k, v in sd.items())
    assert read_checkpoint(root / "good.pt", mmap=False)["state_dict"].keys() == got["state_dict"].keys()


def test_trainer_lets_go_of_the_start_checkpoint_once_restored(tiny, tmp_path, monkeypatch):
    """The start checkpoint (weights + optimizer state) is not held for the run: no reference to the
    loaded dict or its state dict is left when the first step runs."""
    import gc
    import weakref

    from solution.training import setup, trainer

    root, cfg, sd, train_split = tiny
    trainer.main(tiny_argv(train_split, None, tmp_path / "logs", name="a", max_steps=1, batch_size=2))
    start = tmp_path / "logs" / "a" / "checkpoints" / "epoch_latest.pt"

    class Box(dict):  # a dict that takes weak references
        pass

    refs, real_read = [], setup.read_checkpoint

    def read(path, **kw):
        ckpt = Box(real_read(path, **kw))
        ckpt["state_dict"] = Box(ckpt["state_dict"])
        refs.extend([weakref.ref(ckpt), weakref.ref(ckpt["state_dict"])])
        return ckpt

    alive, real_train = [], trainer.Trainer._train

    def train_loop(self, bar):
        gc.collect()
        alive.append([r() is not None for r in refs])
        return real_train(self, bar)

    monkeypatch.setattr(setup, "read_checkpoint", read)
    monkeypatch.setattr(trainer.Trainer, "_train", train_loop)
    trainer.main(
        tiny_argv(
            train_split,
            None,
            tmp_path / "logs",
            name="b",
            max_steps=2,
            batch_size=2,
            resume=start,
            reset_data_offset=True,
        )
    )
    assert alive == [[False, False]]
